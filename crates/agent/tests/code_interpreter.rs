//! Real code-interpreter sandboxes at the runtime level: forked from the template's
//! zygote (`cubicle_runtime::ns::zygote`), with the sandbox's Python processes adopted
//! by the agent and sharing the zygote's memory.
//!
//! Needs root and the built `code-interpreter` template (`scripts/setup` builds it);
//! fails, never skips, without them. The code interpreter's HTTP side is tested with
//! the E2B SDK in tests/e2b/test_code_interpreter.py.

mod support;

use std::collections::BTreeMap;

use support::{Sandbox, TestEnv};

fn ci_spec(env: &TestEnv) -> cubicle_runtime::SandboxSpec {
    let mut spec = env.spec();
    spec.agent.code_interpreter = true;
    spec
}

/// Host pid → command line of the direct children of `pid` (of any of its threads).
fn children(pid: i32) -> BTreeMap<i32, String> {
    let mut list = String::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        list += &std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        list.push(' ');
    }
    list.split_whitespace()
        .map(|c| {
            let child: i32 = c.parse().unwrap();
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            (child, args.join(" "))
        })
        .collect()
}

/// `Rss` and `Pss` of a process, kB.
fn rss_pss(pid: i32) -> (u64, u64) {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let field = |name: &str| {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {rollup}"))
    };
    (field("Rss:"), field("Pss:"))
}

/// The sandbox's Python zygote and default kernel: the agent's children.
fn python_children(sbx: &Sandbox) -> Vec<i32> {
    let kids = children(sbx.info.pid);
    let python: Vec<i32> = kids
        .iter()
        .filter(|(_, cmd)| cmd.starts_with("python3 -c"))
        .map(|(pid, _)| *pid)
        .collect();
    assert_eq!(
        python.len(),
        2,
        "zygote and default kernel expected: {kids:?}"
    );
    python
}

#[tokio::test]
async fn sandboxes_are_forked_from_the_template_zygote_and_share_its_memory() {
    let env = TestEnv::with_template("code-interpreter");
    let a = env.create_spec(ci_spec(&env)).await.expect("create");
    let b = env.create_spec(ci_spec(&env)).await.expect("create");

    // One template zygote, our child, for both.
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let zygotes: Vec<i32> = children(me)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("--template-zygote"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(zygotes.len(), 1, "{:?}", children(me));

    for sbx in [&a, &b] {
        // Inside: the agent is pid 1, its Python processes run as the kernel user.
        let ps = sbx.root_sh("ps -eo pid=,ppid=,user=,comm= | sort -n").await;
        let rows: Vec<Vec<String>> = ps
            .stdout_text()
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect();
        assert_eq!(rows[0][..2], ["1", "0"], "{rows:?}");
        let python: Vec<&Vec<String>> = rows.iter().filter(|r| r[3] == "python3").collect();
        assert_eq!(python.len(), 2, "{rows:?}");
        for row in python {
            assert_eq!(
                (row[1].as_str(), row[2].as_str()),
                ("1", "user"),
                "{rows:?}"
            );
        }
        // Their memory is the zygote's, copy-on-write: most of it is shared.
        for pid in python_children(sbx) {
            let (rss, pss) = rss_pss(pid);
            assert!(
                rss > 50_000,
                "a warm interpreter holds the stack: rss {rss} kB"
            );
            assert!(pss * 3 < rss, "pid {pid}: pss {pss} kB of rss {rss} kB");
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            assert!(status.contains("Seccomp:\t2"), "{status}");
            assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
        }
    }
    a.destroy().await;
    b.destroy().await;
}

#[tokio::test]
async fn a_template_without_the_python_stack_fails_create_clearly() {
    // `base` has python3 but not numpy: neither a template zygote nor the agent's own
    // interpreter can start, and the create says so.
    let env = TestEnv::new();
    let spec = ci_spec(&env);
    let id = spec.id.clone();
    let err = match env.create_spec(spec).await {
        Ok(_) => panic!("a code interpreter without numpy started"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("code interpreter"), "{err}");
    let left = env.data.path().join("sandboxes").join(id.as_str());
    assert!(!left.exists(), "{} left behind", left.display());
}
