//! Per-sandbox resource limits and their validation.

use serde::{Deserialize, Serialize};

/// Why a [`Limits`] value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {value} is out of range; allowed is {min}..={max}")]
pub struct LimitsError {
    /// Which field is wrong.
    pub field: &'static str,
    /// The value given.
    pub value: u64,
    /// The smallest accepted value.
    pub min: u64,
    /// The largest accepted value.
    pub max: u64,
}

/// CPU, memory and process limits of one sandbox (defaults as in the seed report:
/// 2 vCPU, 2 GiB, 1024 processes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// CPU bandwidth in whole CPUs (`cpu.max` = count × period).
    pub cpu_count: u32,
    /// Memory limit in MiB; swap is off.
    pub memory_mb: u64,
    /// Maximum number of tasks (processes and threads) of user code.
    pub pids: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_count: 2,
            memory_mb: 2048,
            pids: 1024,
        }
    }
}

impl Limits {
    /// Accepted CPU counts.
    pub const CPU: (u64, u64) = (1, 256);
    /// Accepted memory sizes in MiB: 32 MiB to 1 TiB.
    pub const MEMORY_MB: (u64, u64) = (32, 1 << 20);
    /// Accepted task counts.
    pub const PIDS: (u64, u64) = (16, 4_194_304);

    /// Accepted writable-layer limits in MiB (`--writable-layer-size`): 16 MiB (a
    /// sandbox's init writes a few files into its layer; less is a typo) to 16 TiB.
    pub const WRITABLE_LAYER_MIB: (u64, u64) = (16, 16 << 20);

    /// Checks a writable-layer limit in MiB against [`Limits::WRITABLE_LAYER_MIB`].
    pub fn check_writable_layer_mib(mib: u64) -> Result<(), LimitsError> {
        check("writableLayerMiB", mib, Self::WRITABLE_LAYER_MIB)
    }

    /// Checks every field against its range.
    pub fn validate(&self) -> Result<(), LimitsError> {
        check("cpuCount", self.cpu_count.into(), Self::CPU)?;
        check("memoryMB", self.memory_mb, Self::MEMORY_MB)?;
        check("pids", self.pids.into(), Self::PIDS)?;
        Ok(())
    }

    /// The memory limit in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mb * 1024 * 1024
    }
}

fn check(field: &'static str, value: u64, (min, max): (u64, u64)) -> Result<(), LimitsError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(LimitsError {
            field,
            value,
            min,
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seed_spec_and_valid() {
        let l = Limits::default();
        assert_eq!((l.cpu_count, l.memory_mb, l.pids), (2, 2048, 1024));
        l.validate().unwrap();
        assert_eq!(l.memory_bytes(), 2 << 30);
    }

    #[test]
    fn writable_layer_limits_have_a_floor() {
        Limits::check_writable_layer_mib(16).unwrap();
        Limits::check_writable_layer_mib(1024).unwrap();
        let err = Limits::check_writable_layer_mib(1).unwrap_err();
        assert_eq!(err.field, "writableLayerMiB");
        assert!(Limits::check_writable_layer_mib(u64::MAX).is_err());
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let zero_cpu = Limits {
            cpu_count: 0,
            ..Limits::default()
        };
        assert_eq!(zero_cpu.validate().unwrap_err().field, "cpuCount");
        let tiny_mem = Limits {
            memory_mb: 1,
            ..Limits::default()
        };
        let err = tiny_mem.validate().unwrap_err();
        assert_eq!((err.field, err.value, err.min), ("memoryMB", 1, 32));
        let few_pids = Limits {
            pids: 3,
            ..Limits::default()
        };
        assert_eq!(few_pids.validate().unwrap_err().field, "pids");
    }
}
