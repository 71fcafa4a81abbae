//! API keys: creation, hashed lookup, listing, deletion.

use std::fmt::Write as _;

use rand::RngCore;
use rusqlite::{OptionalExtension, Row, TransactionBehavior};
use sha2::{Digest, Sha256};

use crate::error::is_unique_violation;
use crate::{now_ms, Store, StoreError};

/// What every key starts with (E2B's format).
pub const KEY_PREFIX: &str = "e2b_";
/// Random bytes in a key (160 bits), written as 40 lowercase hex characters.
const KEY_RANDOM_BYTES: usize = 20;
/// Total length of a key.
const KEY_LEN: usize = KEY_PREFIX.len() + 2 * KEY_RANDOM_BYTES;
/// Characters of the random part kept for display.
const DISPLAY_PREFIX_LEN: usize = 8;
/// `last_used_at_ms` is refreshed at most this often.
const LAST_USED_RESOLUTION_MS: i64 = 60_000;
/// Longest key name.
const MAX_NAME_LEN: usize = 64;

/// An API key as stored: everything except the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Never reused, also after deletion; sandboxes record it as their owner.
    pub id: i64,
    /// Unique, 1–64 characters of `[A-Za-z0-9._-]`.
    pub name: String,
    /// The first 8 characters after `e2b_`, to recognise a key without storing it.
    pub prefix: String,
    /// Creation time, unix ms.
    pub created_at_ms: i64,
    /// Last successful authentication, unix ms, to within a minute.
    pub last_used_at_ms: Option<i64>,
}

const KEY_COLUMNS: &str = "id, name, prefix, created_at_ms, last_used_at_ms";

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<KeyRecord> {
    Ok(KeyRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        prefix: row.get(2)?,
        created_at_ms: row.get(3)?,
        last_used_at_ms: row.get(4)?,
    })
}

fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(ok_char) {
        return Err(StoreError::InvalidInput(format!(
            "invalid api key name {name:?}: use 1 to {MAX_NAME_LEN} characters of \
             A-Z, a-z, 0-9, '.', '_' and '-'"
        )));
    }
    Ok(())
}

fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether `key` has the shape of a key this store issues.
fn well_formed(key: &str) -> bool {
    key.len() == KEY_LEN
        && key.starts_with(KEY_PREFIX)
        && key[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn generate_key() -> Result<String, StoreError> {
    let mut bytes = [0u8; KEY_RANDOM_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| StoreError::io("reading the OS random generator", std::io::Error::other(e)))?;
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(KEY_PREFIX);
    for b in bytes {
        // Writing into a String cannot fail.
        let _ = write!(key, "{b:02x}");
    }
    Ok(key)
}

impl Store {
    /// Creates a key named `name` and returns its record and the plaintext key, which
    /// is not stored and cannot be shown again.
    ///
    /// Errors: [`StoreError::InvalidInput`] for a bad name, [`StoreError::Conflict`] if
    /// a key with this name exists.
    pub fn create_key(&self, name: &str) -> Result<(KeyRecord, String), StoreError> {
        self.create_key_at(name, now_ms())
    }

    pub(crate) fn create_key_at(
        &self,
        name: &str,
        now: i64,
    ) -> Result<(KeyRecord, String), StoreError> {
        validate_name(name)?;
        let key = generate_key()?;
        let hash = hash_key(&key);
        let prefix = &key[KEY_PREFIX.len()..KEY_PREFIX.len() + DISPLAY_PREFIX_LEN];
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let taken = tx
            .prepare_cached("SELECT 1 FROM api_keys WHERE name = ?1")?
            .exists([name])?;
        if taken {
            return Err(conflict_name(name));
        }
        let inserted = tx
            .prepare_cached(
                "INSERT INTO api_keys (name, key_hash, prefix, created_at_ms) \
                 VALUES (?1, ?2, ?3, ?4) RETURNING id",
            )?
            .query_row(rusqlite::params![name, &hash[..], prefix, now], |r| {
                r.get::<_, i64>(0)
            });
        let id = match inserted {
            Ok(id) => id,
            Err(e) if is_unique_violation(&e) => return Err(conflict_name(name)),
            Err(e) => return Err(e.into()),
        };
        tx.commit()?;
        let record = KeyRecord {
            id,
            name: name.to_owned(),
            prefix: prefix.to_owned(),
            created_at_ms: now,
            last_used_at_ms: None,
        };
        Ok((record, key))
    }

    /// The key whose plaintext is `key`, or `None`. Refreshes its `last_used_at_ms`
    /// when that is unset or at least a minute old, so most calls only read.
    pub fn authenticate(&self, key: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.authenticate_at(key, now_ms())
    }

    pub(crate) fn authenticate_at(
        &self,
        key: &str,
        now: i64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        if !well_formed(key) {
            return Ok(None);
        }
        let hash = hash_key(key);
        let conn = self.lock();
        let found = conn
            .prepare_cached(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?1"
            ))?
            .query_row([&hash[..]], key_from_row)
            .optional()?;
        let Some(mut record) = found else {
            return Ok(None);
        };
        let stale = record
            .last_used_at_ms
            .is_none_or(|t| now.saturating_sub(t) >= LAST_USED_RESOLUTION_MS);
        if stale {
            conn.prepare_cached("UPDATE api_keys SET last_used_at_ms = ?2 WHERE id = ?1")?
                .execute([record.id, now])?;
            record.last_used_at_ms = Some(now);
        }
        Ok(Some(record))
    }

    /// Every key, ordered by name.
    pub fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY name"))?;
        let keys = stmt
            .query_map([], key_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(keys)
    }

    /// Deletes the key named `name`; `false` if there was none. Its sandboxes stay,
    /// still recording its (never reused) id as their owner.
    pub fn delete_key(&self, name: &str) -> Result<bool, StoreError> {
        let conn = self.lock();
        let n = conn
            .prepare_cached("DELETE FROM api_keys WHERE name = ?1")?
            .execute([name])?;
        Ok(n > 0)
    }

    /// The name of the key with this id (`None` if it was deleted).
    pub fn key_name(&self, id: i64) -> Result<Option<String>, StoreError> {
        let conn = self.lock();
        let name = conn
            .prepare_cached("SELECT name FROM api_keys WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?;
        Ok(name)
    }

    /// How many keys exist.
    pub fn key_count(&self) -> Result<u64, StoreError> {
        let conn = self.lock();
        let n: i64 = conn
            .prepare_cached("SELECT count(*) FROM api_keys")?
            .query_row([], |r| r.get(0))?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative key count {n}")))
    }
}

fn conflict_name(name: &str) -> StoreError {
    StoreError::Conflict(format!("an api key named {name:?} already exists"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubicle_core::ErrorKind;

    #[test]
    fn key_format() {
        let k = generate_key().unwrap();
        assert_eq!(k.len(), 44);
        assert!(well_formed(&k), "{k}");
        assert_ne!(k, generate_key().unwrap());
        assert!(!well_formed("e2b_"));
        assert!(!well_formed(&k.to_uppercase()));
        assert!(!well_formed(&format!("{k}0")));
        assert!(!well_formed(&format!("x{}", &k[1..])));
        assert!(!well_formed(&format!("{}é", &k[..42])));
    }

    #[test]
    fn lifecycle() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(store.key_count().unwrap(), 0);
        let (rec, key) = store.create_key("alice").unwrap();
        assert_eq!(rec.name, "alice");
        assert_eq!(rec.prefix, key[4..12]);
        assert_eq!(rec.last_used_at_ms, None);
        assert!(key.starts_with("e2b_"));

        let auth = store.authenticate(&key).unwrap().unwrap();
        assert_eq!(auth.id, rec.id);
        assert!(auth.last_used_at_ms.is_some());

        // A wrong key of the right shape, and garbage.
        let mut wrong = key.clone();
        let last = if wrong.ends_with('0') { "1" } else { "0" };
        wrong.replace_range(43.., last);
        assert_eq!(store.authenticate(&wrong).unwrap(), None);
        for junk in ["", "e2b_", "nope", "\0\u{1F600}", &key[..43]] {
            assert_eq!(store.authenticate(junk).unwrap(), None, "{junk:?}");
        }

        let (bob, bob_key) = store.create_key("bob").unwrap();
        assert!(bob.id > rec.id);
        assert_eq!(store.key_count().unwrap(), 2);
        let names: Vec<_> = store
            .list_keys()
            .unwrap()
            .into_iter()
            .map(|k| k.name)
            .collect();
        assert_eq!(names, ["alice", "bob"]);

        assert!(store.delete_key("alice").unwrap());
        assert!(!store.delete_key("alice").unwrap());
        assert_eq!(store.authenticate(&key).unwrap(), None);
        assert_eq!(store.authenticate(&bob_key).unwrap().unwrap().id, bob.id);

        // Ids are never reused, even for the same name.
        let (again, _) = store.create_key("alice").unwrap();
        assert!(again.id > bob.id);
    }

    #[test]
    fn names_are_validated_and_unique() {
        let store = Store::open_in_memory().unwrap();
        for bad in ["", "a b", "ä", "x/y", "tab\t", &"n".repeat(65)] {
            let err = store.create_key(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
        }
        for good in ["a", "ci.runner_2-prod", &"N".repeat(64)] {
            store.create_key(good).unwrap();
        }
        let err = store.create_key("a").unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        assert_eq!(err.to_string(), "an api key named \"a\" already exists");
        assert_eq!(store.key_count().unwrap(), 3);
    }

    #[test]
    fn last_used_is_written_at_most_once_a_minute() {
        let store = Store::open_in_memory().unwrap();
        let (_, key) = store.create_key_at("k", 1_000).unwrap();
        let at = |now| {
            store
                .authenticate_at(&key, now)
                .unwrap()
                .unwrap()
                .last_used_at_ms
        };
        assert_eq!(at(10_000), Some(10_000));
        assert_eq!(at(20_000), Some(10_000));
        assert_eq!(at(69_999), Some(10_000));
        assert_eq!(at(70_000), Some(70_000));
        // A clock that went backwards does not cause writes either.
        assert_eq!(at(5_000), Some(70_000));
        assert_eq!(store.list_keys().unwrap()[0].last_used_at_ms, Some(70_000));
    }

    #[test]
    fn plaintext_is_never_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("keys.db")).unwrap();
        let mut keys = Vec::new();
        for i in 0..20 {
            let (_, key) = store.create_key(&format!("key{i}")).unwrap();
            store.authenticate(&key).unwrap().unwrap();
            keys.push(key);
        }
        let scan = |when: &str| {
            let mut bytes = Vec::new();
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
            }
            assert!(bytes.len() > 4096, "{when}: nothing on disk?");
            for key in &keys {
                let secret = &key.as_bytes()[12..]; // past the displayed prefix
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret),
                    "{when}: plaintext key found on disk"
                );
            }
        };
        scan("with the WAL");
        drop(store);
        scan("after checkpoint");
    }
}
