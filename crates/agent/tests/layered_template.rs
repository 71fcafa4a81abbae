//! Real sandboxes of a layered template: `code-interpreter`, a layer on `base`. Its root
//! is an overlay of both layers (top first) under the sandbox's own writable layer.
//!
//! Needs root and the built `code-interpreter` template (`cubicle tpl build
//! code-interpreter`, which `scripts/setup` runs); fails, never skips, without them.

mod support;

use std::path::{Path, PathBuf};

use support::{Sandbox, TestEnv};

fn env() -> TestEnv {
    let env = TestEnv::with_template("code-interpreter");
    assert_eq!(env.layers.len(), 2, "{:?}", env.layers);
    assert_eq!(env.layers[0], env.rootfs);
    assert!(
        env.layers[1].ends_with("templates/base/rootfs"),
        "{:?}",
        env.layers
    );
    env
}

fn upper(env: &TestEnv, sbx: &Sandbox) -> PathBuf {
    env.data
        .path()
        .join("sandboxes")
        .join(sbx.id().as_str())
        .join("upper")
}

/// Every file below `dir` (relative paths), directories not listed.
fn files_below(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn user_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let c_name = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 16];
    // SAFETY: NUL-terminated strings and a writable buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

#[tokio::test]
async fn python_stack_and_node_run_as_the_default_user() {
    let env = env();
    let sbx = env.create().await;

    let py = sbx
        .sh("python3 -c 'import numpy, pandas, matplotlib.pyplot; print(numpy.__version__)'")
        .await;
    assert_eq!(py.end.exit_code, 0, "{}", py.stderr_text());
    assert!(py.stdout_text().starts_with("1."), "{}", py.stdout_text());
    // The font cache came with the template: nothing is rebuilt, no temporary config.
    assert!(
        !py.stderr_text().contains("font cache"),
        "{}",
        py.stderr_text()
    );
    assert!(
        !py.stderr_text().contains("temporary"),
        "{}",
        py.stderr_text()
    );

    let node = sbx.sh("node -e 'console.log(1+1)'").await;
    assert_eq!(node.end.exit_code, 0, "{}", node.stderr_text());
    assert_eq!(node.stdout_text(), "2\n");

    // More of the stack, a plot with the default font, the user and the owners.
    let more = sbx
        .sh(concat!(
            "set -e; whoami; ",
            "python3 -c 'import scipy.stats, sklearn.linear_model, seaborn, IPython, requests, PIL, openpyxl, sympy; print(\"imports ok\")'; ",
            "python3 -c 'import matplotlib; matplotlib.use(\"Agg\"); import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.title(\"t\"); plt.savefig(\"/tmp/p.png\")'; ",
            "test -s /tmp/p.png && echo plotted; ",
            "stat -c %U:%G /usr/lib/python3/dist-packages/numpy ~/.cache/matplotlib ~/.cache/matplotlib/fontlist-v330.json /home/user /usr/bin/sudo"
        ))
        .await;
    assert_eq!(more.end.exit_code, 0, "{}", more.stderr_text());
    assert_eq!(
        more.stdout_text(),
        "user\nimports ok\nplotted\nroot:root\nuser:user\nuser:user\nuser:user\nroot:root\n",
        "{}",
        more.stderr_text()
    );

    // The imports wrote nothing into the sandbox's layer: every module was compiled
    // and the font cache built when the template was. (Init's own /dev and /run
    // entries and host files live there by design.)
    let written: Vec<String> = files_below(&upper(&env, &sbx))
        .into_iter()
        .filter(|f| {
            !["tmp/", "dev/", "run/"].iter().any(|d| f.starts_with(d))
                && !matches!(f.as_str(), "etc/hostname" | "etc/hosts")
        })
        .collect();
    assert!(
        written.is_empty(),
        "written into the sandbox layer: {written:?}"
    );
    sbx.destroy().await;
}

#[tokio::test]
async fn deleting_files_of_either_layer_hides_them_only_in_that_sandbox() {
    let env = env();
    let (a, b) = (env.create().await, env.create().await);
    let (base, layer) = (&env.layers[1], &env.layers[0]);
    let numpy_init = "usr/lib/python3/dist-packages/numpy/__init__.py";
    assert!(base.join("usr/bin/yes").exists() && !layer.join("usr/bin/yes").exists());
    assert!(layer.join(numpy_init).exists() && !base.join(numpy_init).exists());

    let rm = a
        .root_sh(&format!("rm /usr/bin/yes /{numpy_init} && echo removed"))
        .await;
    assert_eq!(rm.stdout_text(), "removed\n", "{}", rm.stderr_text());
    let check =
        format!("for f in /usr/bin/yes /{numpy_init}; do test -e $f && echo $f; done; true");
    assert_eq!(a.sh(&check).await.stdout_text(), "");
    assert_eq!(
        b.sh(&check).await.stdout_text(),
        format!("/usr/bin/yes\n/{numpy_init}\n")
    );
    // Both deletions are whiteouts in a's own layer; the template layers are intact.
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    for f in ["usr/bin/yes", numpy_init] {
        let m = std::fs::symlink_metadata(upper(&env, &a).join(f)).unwrap();
        assert!(m.file_type().is_char_device() && m.rdev() == 0, "{f}");
    }
    assert!(base.join("usr/bin/yes").exists());
    assert!(layer.join(numpy_init).exists());
    let py = b.sh("python3 -c 'import numpy'").await;
    assert_eq!(py.end.exit_code, 0, "{}", py.stderr_text());
    a.destroy().await;
    b.destroy().await;
}

#[tokio::test]
async fn directories_of_the_layers_can_be_removed_and_made_again() {
    let env = env();
    let (a, b) = (env.create().await, env.create().await);
    // /etc/apt comes from base, /usr/share/doc from both layers, ~/.cache/matplotlib
    // from the code-interpreter layer only.
    let script = concat!(
        "set -e; ",
        "for d in /etc/apt /usr/share/doc /home/user/.cache/matplotlib; do ",
        "  test -n \"$(ls -A $d)\"; rm -rf $d; mkdir $d; echo new > $d/marker; ",
        "  echo \"$d: $(ls -A $d | tr '\\n' ' ')\"; ",
        "done; ",
        "mv /usr/lib/python3/dist-packages/seaborn /tmp/seaborn-moved; ",
        "test ! -e /usr/lib/python3/dist-packages/seaborn; test -f /tmp/seaborn-moved/__init__.py; ",
        "echo moved"
    );
    let out = a.root_sh(script).await;
    assert_eq!(
        out.stdout_text(),
        "/etc/apt: marker \n/usr/share/doc: marker \n/home/user/.cache/matplotlib: marker \nmoved\n",
        "{}",
        out.stderr_text()
    );
    // The recreated directories are opaque in a's layer, marked in the user.* namespace
    // (the only one overlayfs uses inside a user namespace).
    for d in ["etc/apt", "usr/share/doc", "home/user/.cache/matplotlib"] {
        assert_eq!(
            user_xattr(&upper(&env, &a).join(d), "user.overlay.opaque").as_deref(),
            Some(&b"y"[..]),
            "{d}"
        );
    }
    // Nothing changed for b.
    let seen = b
        .sh("ls /etc/apt/sources.list /home/user/.cache/matplotlib/fontlist-v330.json /usr/lib/python3/dist-packages/seaborn/__init__.py; ls /usr/share/doc | grep -c -v marker")
        .await;
    assert_eq!(seen.end.exit_code, 0, "{}", seen.stderr_text());
    let doc_count: usize = seen.stdout_text().lines().last().unwrap().parse().unwrap();
    assert!(doc_count > 50, "{}", seen.stdout_text());
    a.destroy().await;
    b.destroy().await;
}
