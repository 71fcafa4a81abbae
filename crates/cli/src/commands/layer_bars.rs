//! Progress bars of an image's layers on stderr, while they are downloaded, verified
//! and unpacked (in-process builds and daemon jobs alike).
//!
//! Layers go through each stage one after the other, so there is at most one bar at a
//! time: it is redrawn in place (`\r`) while its layer's stage runs and cleared when it
//! completes, where the build's own log line ("layer 2/3 (...): downloaded 40.0 MiB in
//! 0.4 s", "...: verified ...", "...: unpacked ...") takes its place. Bars are drawn
//! only when stderr is a terminal; otherwise those log lines, one per layer and stage,
//! are all there is.

use std::io::{IsTerminal, Write};

/// The bar being drawn, if any.
#[derive(Debug)]
pub(crate) struct LayerBars {
    tty: bool,
    /// Whether a bar is on the current line of stderr.
    drawn: bool,
}

impl LayerBars {
    /// Bars if stderr is a terminal, nothing otherwise.
    pub(crate) fn for_stderr() -> Self {
        LayerBars {
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    /// Shows the progress of layer `index` of `count` in `stage`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn update(
        &mut self,
        index: usize,
        count: usize,
        digest: &str,
        stage: &str,
        done: u64,
        total: u64,
        cached: bool,
    ) {
        if !self.tty || cached {
            return;
        }
        let mut err = std::io::stderr().lock();
        if done >= total {
            let _ = write!(err, "\r\x1b[K");
            self.drawn = false;
        } else {
            let _ = write!(
                err,
                "\r\x1b[K{}",
                bar_line(index, count, digest, stage, done, total)
            );
            self.drawn = true;
        }
        let _ = err.flush();
    }

    /// Removes a bar still drawn, before something else is printed.
    pub(crate) fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

/// `    layer 2/3 sha256:0123456789ab unpacking   [#########-----------]  12.0/ 40.0 MiB`
pub(crate) fn bar_line(
    index: usize,
    count: usize,
    digest: &str,
    stage: &str,
    done: u64,
    total: u64,
) -> String {
    const WIDTH: u64 = 30;
    let short: String = digest.chars().take(7 + 12).collect();
    let filled = (done.min(total) * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
    format!(
        "    layer {index}/{count} {short} {stage:<11} [{}{}] {:5.1}/{:5.1} MiB",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize),
        mib(done),
        mib(total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            bar_line(2, 3, &d, "unpacking", 12 << 20, 40 << 20),
            format!(
                "    layer 2/3 sha256:abababababab unpacking   [{}{}]  12.0/ 40.0 MiB",
                "#".repeat(9),
                "-".repeat(21)
            )
        );
        assert!(bar_line(1, 1, &d, "verifying", 0, 0).contains(&"#".repeat(30)));
        // Not a terminal (as under `cargo test`): nothing is drawn.
        let mut b = LayerBars {
            tty: false,
            drawn: false,
        };
        b.update(1, 1, &d, "downloading", 5, 10, false);
        assert!(!b.drawn);
    }
}
