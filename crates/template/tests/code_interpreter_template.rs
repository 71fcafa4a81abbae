//! Checks the real `code-interpreter` template built by `cubicle tpl build
//! code-interpreter` in the data directory `$CUBICLE_DATA_DIR` (default
//! `/var/lib/cubicle`): a layer on `base` holding only its delta. Fails, never skips, if
//! it is not built.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use cubicle_core::{uid_map, DataDir, TemplateName};
use cubicle_template::{recipe, Template, TemplateError, TemplateStore};

fn store() -> TemplateStore {
    let dir = std::env::var_os("CUBICLE_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DataDir::DEFAULT));
    TemplateStore::new(DataDir::new(dir))
}

fn get(name: &str) -> Template {
    let store = store();
    let n: TemplateName = name.parse().unwrap();
    match store.get(&n) {
        Ok(t) => t,
        Err(TemplateError::NotFound { .. }) => panic!(
            "{name} template not built: run `cubicle tpl build {name}` (data dir {})",
            store.data_dir().root().display()
        ),
        Err(e) => panic!("{name} template is not usable: {e}"),
    }
}

fn ci() -> Template {
    get("code-interpreter")
}

fn lstat(p: &Path) -> Option<fs::Metadata> {
    fs::symlink_metadata(p).ok()
}

#[test]
fn is_a_current_layer_on_base_found_by_its_alias() {
    let store = store();
    let t = ci();
    let base = get("base");
    assert_eq!(t.meta.recipe, "code-interpreter");
    assert_eq!(t.meta.format_version, 2);
    assert_eq!(t.parent(), Some("base"));
    assert_eq!(t.meta.aliases, ["code-interpreter-v1"]);
    assert!(t.meta.code_interpreter);
    assert_eq!(t.meta.uid_shift, uid_map::HOST_BASE);
    assert_eq!(
        t.meta.recipe_hash,
        recipe::CODE_INTERPRETER.hash(t.meta.uid_shift),
        "the recipe changed since the template was built: run `cubicle tpl build code-interpreter`"
    );
    assert_eq!(
        t.meta.parent_built_at.as_deref(),
        Some(base.meta.built_at.as_str()),
        "base was rebuilt after code-interpreter: run `cubicle tpl build code-interpreter`"
    );
    assert_eq!(t.layers(&store).unwrap(), [t.rootfs.clone(), base.rootfs]);
    let by_alias = get("code-interpreter-v1");
    assert_eq!(by_alias, t);
    // Only the delta: well below a full root filesystem plus the stack, but not empty.
    assert!(t.meta.size_bytes > 100 << 20, "{}", t.meta.size_bytes);
    assert!(t.meta.file_count > 5000, "{}", t.meta.file_count);
}

#[test]
fn delta_has_the_stack_but_not_the_base_files() {
    let t = ci();
    let base = get("base");
    let dist = t.rootfs.join("usr/lib/python3/dist-packages");
    for m in [
        "numpy/__init__.py",
        "numpy/__pycache__/__init__.cpython-311.pyc",
        "pandas/__init__.py",
        "matplotlib/__init__.py",
        "matplotlib_inline/__init__.py",
        "scipy/__init__.py",
        "IPython/__init__.py",
        "requests/__init__.py",
        "PIL/__init__.py",
        "seaborn/__init__.py",
    ] {
        assert!(
            lstat(&dist.join(m)).is_some_and(|m| m.is_file()),
            "{m} missing"
        );
    }
    let node = lstat(&t.rootfs.join("usr/bin/node")).expect("usr/bin/node missing");
    assert!(node.is_file() && node.mode() & 0o111 != 0);
    assert!(lstat(
        &t.rootfs
            .join("usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    )
    .is_some());
    // What base has stays in base: not copied into the delta.
    for p in [
        "usr/bin/bash",
        "usr/bin/sudo",
        "usr/bin/python3.11",
        "usr/lib/python3.11/os.py",
        "etc/passwd",
        "etc/resolv.conf",
        "etc/apt/sources.list",
        "home/user/.bashrc",
    ] {
        assert!(lstat(&base.rootfs.join(p)).is_some(), "{p} not in base");
        assert!(
            lstat(&t.rootfs.join(p)).is_none(),
            "{p} copied into the delta"
        );
    }
    // Trimmed: no test suites, apt lists, downloaded packages, logs or temporary files.
    let entries = |p: &str| -> Vec<String> {
        fs::read_dir(t.rootfs.join(p))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for pkg in ["numpy", "pandas", "scipy", "matplotlib"] {
        assert!(
            lstat(&dist.join(pkg).join("tests")).is_none(),
            "{pkg}/tests left"
        );
    }
    assert!(entries("var/lib/apt/lists").is_empty(), "apt lists left");
    assert!(entries("var/cache/apt/archives")
        .iter()
        .all(|n| !n.ends_with(".deb")));
    assert!(entries("tmp").is_empty(), "{:?}", entries("tmp"));
    assert!(entries("var/log")
        .iter()
        .all(|n| t.rootfs.join("var/log").join(n).is_dir()));
    // The stand-ins are recorded as such.
    let status = fs::read_to_string(t.rootfs.join("var/lib/dpkg/status")).unwrap();
    assert!(status.contains("Package: python3-pythran\n"));
    assert!(status.contains("+cubicle.stub\n"));
}

#[test]
fn font_cache_belongs_to_user() {
    let t = ci();
    let shift = t.meta.uid_shift;
    for (p, id) in [
        ("home/user/.cache/matplotlib/fontlist-v330.json", 1000),
        ("home/user/.cache/matplotlib", 1000),
        ("home/user/.config/matplotlib", 1000),
        ("home/user", 1000),
        ("root/.cache/matplotlib/fontlist-v330.json", 0),
    ] {
        let m = lstat(&t.rootfs.join(p)).unwrap_or_else(|| panic!("{p} missing"));
        assert_eq!((m.uid(), m.gid()), (shift + id, shift + id), "{p}");
    }
}

#[test]
fn every_entry_is_shifted_and_whiteouts_are_whiteouts() {
    let t = ci();
    let base = get("base");
    let shift = t.meta.uid_shift;
    let mut stack = vec![t.rootfs.clone()];
    let mut seen = 0u64;
    while let Some(p) = stack.pop() {
        let m = lstat(&p).unwrap();
        seen += 1;
        assert!(
            m.uid() >= shift && m.gid() >= shift,
            "{} is owned by {}:{}, below the uid shift {shift}",
            p.display(),
            m.uid(),
            m.gid()
        );
        assert!(m.uid() - shift < uid_map::RANGE && m.gid() - shift < uid_map::RANGE);
        if m.file_type().is_char_device() {
            // The only devices a layer may hold are overlayfs whiteouts: 0/0, hiding a
            // file of a lower layer.
            assert_eq!(m.rdev(), 0, "{} is a real device", p.display());
            let below = base.rootfs.join(p.strip_prefix(&t.rootfs).unwrap());
            assert!(lstat(&below).is_some(), "{} hides nothing", p.display());
        }
        assert!(!m.file_type().is_block_device(), "{}", p.display());
        if m.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    assert_eq!(seen, t.meta.file_count + 1, "file count in template.json");
}
