//! `cubicle-agent`: the first process of every sandbox.
//!
//! - `cubicle-agent init`: executed by the runtime into fresh namespaces; sets the sandbox
//!   up (see `cubicle_runtime::ns::init`) and executes `serve` from inside the sandbox.
//! - `cubicle-agent serve --config-fd N`: the envd server (pid 1 of the sandbox).
//! - `cubicle-agent zygote`: executed by the runtime into a template zygote's fresh
//!   namespaces (see `cubicle_runtime::ns::zygote`); becomes the template's warm Python.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("init") => cubicle_runtime::ns::init::run(),
        Some("zygote") => cubicle_runtime::ns::zygote::setup::run(
            cubicle_agent::interpreter::kernel::PYTHON_KERNEL,
        ),
        Some("serve") => {
            let fd = match (args.get(2).map(String::as_str), args.get(3)) {
                (Some("--config-fd"), Some(n)) => n.parse::<i32>().ok(),
                _ => None,
            };
            match fd {
                Some(fd) => cubicle_agent::serve_main(fd),
                None => usage(),
            }
        }
        Some("--version") => println!("cubicle-agent {}", env!("CARGO_PKG_VERSION")),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: cubicle-agent init | zygote | serve --config-fd N\n\
         (started by the cubicle runtime inside a sandbox, not by hand)"
    );
    std::process::exit(2)
}
