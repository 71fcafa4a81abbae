//! Shared harness for tests that run real sandboxes: the `ns` runtime with the
//! freshly built agent, the `base` template from the data dir, and sandboxes that clean
//! up after themselves.
//!
//! These tests need root (CI runs as root) and the `base` template (`.ci/run` builds
//! it). Without either they fail with a message saying so; they never skip.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use cubicle_core::{DataDir, Limits, SandboxId, TemplateName};
use cubicle_envd::client::EnvdClient;
use cubicle_runtime::ns::{NsConfig, NsRuntime};
use cubicle_runtime::{AgentConfig, Runtime, RuntimeError, SandboxInfo, SandboxSpec};
use cubicle_template::TemplateStore;

/// The data dir holding the templates (`CUBICLE_DATA_DIR`, default /var/lib/cubicle).
pub fn template_data_dir() -> DataDir {
    DataDir::new(std::env::var("CUBICLE_DATA_DIR").unwrap_or_else(|_| DataDir::DEFAULT.into()))
}

/// A runtime whose sandboxes live in a private temporary data dir.
pub struct TestEnv {
    pub runtime: Arc<NsRuntime>,
    /// The template's own layer (the top one).
    pub rootfs: PathBuf,
    /// Every layer of the template, top first.
    pub layers: Vec<PathBuf>,
    pub uid_shift: u32,
    pub data: tempfile::TempDir,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        Self::with_cgroup_parent("cubicle-test")
    }

    /// An environment whose sandboxes start from the built template `template`.
    pub fn with_template(template: &str) -> TestEnv {
        Self::build("cubicle-test", template)
    }

    /// An environment whose sandbox cgroups live under `parent`.
    pub fn with_cgroup_parent(parent: &str) -> TestEnv {
        Self::build(parent, "base")
    }

    fn build(parent: &str, template_name: &str) -> TestEnv {
        assert_eq!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() },
            0,
            "sandbox tests need root (namespaces, cgroups); run them as root like CI does"
        );
        let store = TemplateStore::new(template_data_dir());
        let name: TemplateName = template_name.parse().unwrap();
        let template = store.get(&name).unwrap_or_else(|e| {
            panic!("{name} template not built: run `cubicle tpl build {name}` ({e})")
        });
        let layers = template
            .layers(&store)
            .unwrap_or_else(|e| panic!("{name} template not usable: {e}"));
        let data = tempfile::Builder::new()
            .prefix("cubicle-test-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let mut config = NsConfig::new(
            DataDir::new(data.path()),
            PathBuf::from(env!("CARGO_BIN_EXE_cubicle-agent")),
        );
        config.cgroup_parent = parent.into();
        let runtime = Arc::new(NsRuntime::new(config).expect("runtime"));
        TestEnv {
            runtime,
            rootfs: template.rootfs.clone(),
            layers,
            uid_shift: template.meta.uid_shift,
            data,
        }
    }

    /// A spec for a new sandbox of the environment's template with default settings.
    pub fn spec(&self) -> SandboxSpec {
        let id = SandboxId::generate();
        SandboxSpec {
            agent: AgentConfig::new(id.to_string()),
            id,
            layers: self.layers.clone(),
            uid_shift: self.uid_shift,
            limits: Limits::default(),
            writable_layer_mib: None,
        }
    }

    pub async fn create(&self) -> Sandbox {
        self.create_spec(self.spec()).await.expect("create sandbox")
    }

    pub async fn create_spec(&self, spec: SandboxSpec) -> Result<Sandbox, RuntimeError> {
        let token = spec.agent.access_token.clone();
        let info = self.runtime.create(spec).await?;
        Ok(self.wrap(info, token))
    }

    /// A sandbox restored from the checkpoint in `dir`.
    #[allow(dead_code)] // not every test binary restores
    pub async fn create_restored(
        &self,
        dir: &std::path::Path,
        spec: SandboxSpec,
    ) -> Result<Sandbox, RuntimeError> {
        let token = spec.agent.access_token.clone();
        let info = self.runtime.restore(dir, spec).await?;
        Ok(self.wrap(info, token))
    }

    fn wrap(&self, info: SandboxInfo, token: Option<String>) -> Sandbox {
        let mut client = EnvdClient::new(&info.agent_socket);
        if let Some(t) = token {
            client = client.with_access_token(t);
        }
        Sandbox {
            info,
            client,
            runtime: self.runtime.clone(),
            destroyed: false,
        }
    }
}

/// A running sandbox, destroyed when dropped.
pub struct Sandbox {
    pub info: SandboxInfo,
    pub client: EnvdClient,
    runtime: Arc<NsRuntime>,
    destroyed: bool,
}

impl Sandbox {
    pub fn id(&self) -> &SandboxId {
        &self.info.id
    }

    /// Runs a shell command as the default user; panics on transport errors.
    pub async fn sh(&self, cmd: &str) -> cubicle_envd::client::CommandOutput {
        self.client.run(cmd, None).await.expect("run command")
    }

    /// Runs a shell command as root.
    pub async fn root_sh(&self, cmd: &str) -> cubicle_envd::client::CommandOutput {
        self.client
            .run(cmd, Some("root"))
            .await
            .expect("run command")
    }

    pub async fn destroy(mut self) {
        self.destroyed = true;
        self.runtime.destroy(&self.info.id).await.expect("destroy");
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.destroyed {
            return;
        }
        let runtime = self.runtime.clone();
        let id = self.info.id.clone();
        // Drop cannot await; tear down on a private runtime so a failing test leaks nothing.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(runtime.destroy(&id))
        })
        .join();
    }
}
