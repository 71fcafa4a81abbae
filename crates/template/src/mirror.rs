//! Finding a Debian mirror in the host's apt sources, so that builds use the same
//! (possibly local or proxied) mirror as the host and no URL is hard-coded.
//!
//! Both apt formats are understood: the one-line format of `sources.list` and
//! `sources.list.d/*.list` (`deb [opt=val ...] URI SUITE COMPONENT...`), and the deb822
//! format of `sources.list.d/*.sources` (stanzas of `Types:`, `URIs:`, `Suites:`,
//! `Components:` fields). Parsing and selection are pure functions over file contents;
//! only [`host_mirror`] touches the file system.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::TemplateError;

/// Where apt's configuration lives on the host.
pub const HOST_APT_DIR: &str = "/etc/apt";

/// One source entry: a one-line entry or a deb822 stanza.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AptSource {
    /// `deb` and/or `deb-src`.
    pub types: Vec<String>,
    /// Repository URIs.
    pub uris: Vec<String>,
    /// Suites (distribution names such as `bookworm` or `bookworm-updates`).
    pub suites: Vec<String>,
    /// Components such as `main` or `contrib`.
    pub components: Vec<String>,
    /// False for deb822 stanzas with `Enabled: no`.
    pub enabled: bool,
}

impl AptSource {
    /// Whether this entry is an enabled binary source carrying exactly `suite` with
    /// the `main` component.
    pub fn carries(&self, suite: &str) -> bool {
        self.enabled
            && self.types.iter().any(|t| t == "deb")
            && self.suites.iter().any(|s| s == suite)
            && self.components.iter().any(|c| c == "main")
    }
}

/// Parses the one-line format (`sources.list`, `*.list`). Malformed lines are skipped,
/// as apt would refuse them anyway.
pub fn parse_one_line(text: &str) -> Vec<AptSource> {
    text.lines().filter_map(parse_one_line_entry).collect()
}

fn parse_one_line_entry(line: &str) -> Option<AptSource> {
    let line = line.split('#').next().unwrap_or("");
    let mut tokens = line.split_whitespace().peekable();
    let kind = tokens.next()?;
    if kind != "deb" && kind != "deb-src" {
        return None;
    }
    // Options: `[arch=amd64 signed-by=/k.gpg]`, `[ arch=amd64 ]`, ...
    if tokens.peek().is_some_and(|t| t.starts_with('[')) {
        loop {
            let t = tokens.next()?;
            if t.ends_with(']') {
                break;
            }
        }
    }
    let uri = tokens.next()?;
    let suite = tokens.next()?;
    Some(AptSource {
        types: vec![kind.to_owned()],
        uris: vec![uri.to_owned()],
        suites: vec![suite.to_owned()],
        components: tokens.map(str::to_owned).collect(),
        enabled: true,
    })
}

/// Parses the deb822 format (`*.sources`): stanzas separated by blank lines, `#` comment
/// lines, folded continuation lines, case-insensitive field names, `Enabled: no`.
pub fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    let flush = |fields: &mut Vec<(String, String)>, out: &mut Vec<AptSource>| {
        if fields.is_empty() {
            return;
        }
        let list = |name: &str| -> Vec<String> {
            fields
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .flat_map(|(_, v)| v.split_whitespace().map(str::to_owned))
                .collect()
        };
        let enabled = fields
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case("Enabled"))
            .is_none_or(|(_, v)| !v.trim().eq_ignore_ascii_case("no"));
        out.push(AptSource {
            types: list("Types"),
            uris: list("URIs"),
            suites: list("Suites"),
            components: list("Components"),
            enabled,
        });
        fields.clear();
    };
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            flush(&mut fields, &mut out);
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push('\n');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            fields.push((key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    flush(&mut fields, &mut out);
    out
}

/// Parses one file of `/etc/apt` by its name, as apt does: `*.list` is one-line,
/// `*.sources` is deb822, anything else (`*.disabled`, `*.save`, ...) is ignored.
pub fn parse_source_file(file_name: &str, text: &str) -> Vec<AptSource> {
    if file_name.ends_with(".list") {
        parse_one_line(text)
    } else if file_name.ends_with(".sources") {
        parse_deb822(text)
    } else {
        Vec::new()
    }
}

/// Picks a mirror for `suite` from apt source files given as `(file name, contents)` in
/// apt's reading order.
///
/// An entry qualifies if it is an enabled `deb` source whose suites contain exactly
/// `suite` and whose components contain `main`; so security, updates and third-party
/// repositories (which name their own suites) do not. Among qualifying URIs the most
/// Debian-like wins (`*.debian.org`, then a path ending in `/debian`), ties going to
/// the first listed. `mirror+file:` URIs are resolved through `read_file`, which
/// returns a mirror list's contents.
pub fn select_mirror(
    files: &[(String, String)],
    suite: &str,
    read_file: &dyn Fn(&Path) -> Option<String>,
) -> Option<String> {
    let mut candidates: Vec<(u8, String)> = Vec::new();
    for (name, text) in files {
        for source in parse_source_file(name, text) {
            if !source.carries(suite) {
                continue;
            }
            for uri in &source.uris {
                let Some(uri) = resolve_uri(uri, read_file) else {
                    continue;
                };
                if !candidates.iter().any(|(_, u)| *u == uri) {
                    candidates.push((debian_likeness(&uri), uri));
                }
            }
        }
    }
    // Stable sort: ties keep apt's order.
    candidates.sort_by_key(|(score, _)| std::cmp::Reverse(*score));
    candidates.into_iter().next().map(|(_, uri)| uri)
}

/// Turns an apt URI into one debootstrap can fetch from, if possible.
fn resolve_uri(uri: &str, read_file: &dyn Fn(&Path) -> Option<String>) -> Option<String> {
    if let Some(list) = uri.strip_prefix("mirror+file:") {
        let path = list.strip_prefix("//").unwrap_or(list);
        let text = read_file(Path::new(path))?;
        return text
            .lines()
            .filter_map(|l| l.split(['#', '\t', ' ']).next())
            .map(str::trim)
            .find(|u| u.starts_with("http://") || u.starts_with("https://"))
            .map(normalize);
    }
    validate_mirror(uri).ok()
}

fn normalize(uri: &str) -> String {
    uri.trim_end_matches('/').to_owned()
}

fn debian_likeness(uri: &str) -> u8 {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.rsplit('@').next().unwrap_or(host);
    let host = host.split(':').next().unwrap_or(host);
    if host == "debian.org" || host.ends_with(".debian.org") {
        3
    } else if path.trim_end_matches('/').rsplit('/').next() == Some("debian") {
        2
    } else if uri.contains("debian") {
        1
    } else {
        0
    }
}

/// Checks that `url` is something debootstrap can fetch from (`http://`, `https://` or
/// `file:` with a path) and returns it without a trailing slash.
pub fn validate_mirror(url: &str) -> Result<String, TemplateError> {
    let bad = |reason| TemplateError::InvalidMirror {
        url: url.to_owned(),
        reason,
    };
    if url.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it must be non-empty without spaces"));
    }
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if let Some(r) = url.strip_prefix("https://") {
        r
    } else if let Some(r) = url.strip_prefix("file:") {
        if !r.starts_with('/') {
            return Err(bad("a file: URL needs an absolute path"));
        }
        return Ok(normalize(url));
    } else {
        return Err(bad("only http://, https:// and file:/ URLs are supported"));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("it has no host"));
    }
    Ok(normalize(url))
}

/// Finds a mirror for `suite` in the host's apt sources (`/etc/apt/sources.list`, then
/// `/etc/apt/sources.list.d/*.list` and `*.sources` in name order).
pub fn host_mirror(suite: &str) -> Result<String, TemplateError> {
    host_mirror_in(Path::new(HOST_APT_DIR), suite)
}

/// [`host_mirror`] with apt's configuration in `apt_dir` instead of `/etc/apt`.
pub fn host_mirror_in(apt_dir: &Path, suite: &str) -> Result<String, TemplateError> {
    let mut files = Vec::new();
    let main = apt_dir.join("sources.list");
    if let Ok(text) = fs::read_to_string(&main) {
        files.push(("sources.list".to_owned(), text));
    }
    let parts = apt_dir.join("sources.list.d");
    let mut names: Vec<PathBuf> = match fs::read_dir(&parts) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => {
            tracing::debug!("cannot read {}: {e}", parts.display());
            Vec::new()
        }
    };
    names.sort();
    for path in names {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !(name.ends_with(".list") || name.ends_with(".sources")) {
            continue;
        }
        match fs::read_to_string(&path) {
            Ok(text) => files.push((name.to_owned(), text)),
            Err(e) => tracing::warn!("skipping {}: {e}", path.display()),
        }
    }
    select_mirror(&files, suite, &|p| fs::read_to_string(p).ok()).ok_or_else(|| {
        TemplateError::NoMirror {
            suite: suite.to_owned(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's `/etc/apt/sources.list.d/debian.sources` (Debian 12 containers).
    const DEBIAN_SOURCES: &str = "\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

    const NODESOURCE_SOURCES: &str = "\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
Architectures: amd64
Signed-By: /usr/share/keyrings/nodesource.gpg
";

    const GOOGLE_LIST: &str =
        "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n";

    /// A classic bookworm `sources.list` as the installer writes it.
    const CLASSIC_LIST: &str = "\
#deb cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_ - Official amd64 NETINST with firmware 20240210-11:27]/ bookworm contrib main non-free-firmware

deb http://ftp.de.debian.org/debian/ bookworm main non-free-firmware
deb-src http://ftp.de.debian.org/debian/ bookworm main non-free-firmware

deb http://security.debian.org/debian-security bookworm-security main non-free-firmware
deb-src http://security.debian.org/debian-security bookworm-security main non-free-firmware

# bookworm-updates, to get updates before a point release is made;
deb http://ftp.de.debian.org/debian/ bookworm-updates main non-free-firmware
";

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }

    fn no_files(_: &Path) -> Option<String> {
        None
    }

    fn pick(list: &[(&str, &str)]) -> Option<String> {
        select_mirror(&files(list), "bookworm", &no_files)
    }

    #[test]
    fn parses_deb822_stanzas_with_comments() {
        let s = parse_deb822(DEBIAN_SOURCES);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].uris, ["http://deb.debian.org/debian"]);
        assert_eq!(s[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(s[0].components, ["main"]);
        assert!(s[0].enabled && s[0].carries("bookworm"));
        assert_eq!(s[1].suites, ["bookworm-security"]);
        assert!(!s[1].carries("bookworm"));
    }

    #[test]
    fn parses_one_line_entries_with_options_and_comments() {
        let text = "\
# a comment
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://a.example/debian bookworm main contrib # trailing
deb [ arch=amd64,arm64 trusted=yes ] https://b.example/debian bookworm main
deb-src http://c.example/debian bookworm main
deb http://d.example/debian
bogus line
";
        let s = parse_one_line(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].uris, ["http://a.example/debian"]);
        assert_eq!(s[0].components, ["main", "contrib"]);
        assert_eq!(s[1].uris, ["https://b.example/debian"]);
        assert_eq!(s[2].types, ["deb-src"]);
        assert!(!s[2].carries("bookworm"));
    }

    #[test]
    fn this_machines_sources_pick_deb_debian_org() {
        let got = pick(&[
            ("debian.sources", DEBIAN_SOURCES),
            ("google-cloud-sdk.list", GOOGLE_LIST),
            ("nodesource.sources", NODESOURCE_SOURCES),
        ]);
        assert_eq!(got.as_deref(), Some("http://deb.debian.org/debian"));
    }

    #[test]
    fn classic_sources_list_picks_the_plain_suite() {
        let got = pick(&[("sources.list", CLASSIC_LIST)]);
        assert_eq!(got.as_deref(), Some("http://ftp.de.debian.org/debian"));
    }

    #[test]
    fn third_party_only_finds_nothing() {
        assert_eq!(
            pick(&[
                ("google-cloud-sdk.list", GOOGLE_LIST),
                ("nodesource.sources", NODESOURCE_SOURCES),
                (
                    "docker.list",
                    "deb https://download.docker.com/linux/debian bookworm stable\n"
                ),
            ]),
            None
        );
        // A bullseye host does not carry bookworm either.
        assert_eq!(
            pick(&[(
                "sources.list",
                "deb http://deb.debian.org/debian bullseye main\n"
            )]),
            None
        );
    }

    #[test]
    fn debian_entries_beat_third_party_repos_with_the_same_suite() {
        let got = pick(&[
            (
                "php.list",
                "deb https://packages.sury.org/php/ bookworm main\n",
            ),
            (
                "sources.list.local",
                "deb http://ignored.example/debian bookworm main\n",
            ),
            (
                "zz-local.list",
                "deb http://mirror.example.net/debian bookworm main\n",
            ),
        ]);
        assert_eq!(got.as_deref(), Some("http://mirror.example.net/debian"));
        let got = pick(&[
            (
                "a.list",
                "deb http://mirror.example.net/debian bookworm main\n",
            ),
            ("debian.sources", DEBIAN_SOURCES),
        ]);
        assert_eq!(got.as_deref(), Some("http://deb.debian.org/debian"));
    }

    #[test]
    fn deb822_multiple_values_folding_and_disabled_stanzas() {
        let text = "\
Types: deb deb-src
URIs: http://off.example/debian
Suites: bookworm
Components: main
Enabled: no

# a comment between stanzas

types: deb
uris: cdrom:/media/cdrom/
  https://deb.example.org/debian/
suites: bookworm-backports
  bookworm
components: contrib main
signed-by:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBGNx...
 -----END PGP PUBLIC KEY BLOCK-----
";
        let s = parse_deb822(text);
        assert_eq!(s.len(), 2);
        assert!(!s[0].enabled);
        assert_eq!(
            s[1].uris,
            ["cdrom:/media/cdrom/", "https://deb.example.org/debian/"]
        );
        assert_eq!(s[1].suites, ["bookworm-backports", "bookworm"]);
        let got = pick(&[("x.sources", text)]);
        assert_eq!(got.as_deref(), Some("https://deb.example.org/debian"));
    }

    #[test]
    fn component_must_include_main() {
        assert_eq!(
            pick(&[(
                "sources.list",
                "deb http://deb.debian.org/debian bookworm contrib non-free\n"
            )]),
            None
        );
    }

    #[test]
    fn mirror_file_uris_are_resolved() {
        let text = "\
Types: deb
URIs: mirror+file:///etc/apt/mirrors/debian.list
Suites: bookworm bookworm-updates bookworm-backports
Components: main
";
        let read = |p: &Path| -> Option<String> {
            (p == Path::new("/etc/apt/mirrors/debian.list"))
                .then(|| "# mirrors\nhttps://deb.debian.org/debian\tpriority:1\n".to_owned())
        };
        let got = select_mirror(&files(&[("debian.sources", text)]), "bookworm", &read);
        assert_eq!(got.as_deref(), Some("https://deb.debian.org/debian"));
        assert_eq!(pick(&[("debian.sources", text)]), None);
    }

    #[test]
    fn unknown_file_extensions_are_ignored() {
        assert_eq!(
            pick(&[(
                "debian.list.disabled",
                "deb http://deb.debian.org/debian bookworm main\n"
            )]),
            None
        );
    }

    #[test]
    fn reads_an_apt_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = host_mirror_in(dir.path(), "bookworm").unwrap_err();
        assert_eq!(
            err.to_string(),
            "no Debian bookworm mirror in the host's apt sources; pass --mirror URL"
        );
        let d = dir.path().join("sources.list.d");
        fs::create_dir(&d).unwrap();
        fs::write(
            d.join("nodesource.sources.disabled-by-farm"),
            DEBIAN_SOURCES,
        )
        .unwrap();
        fs::write(d.join("google.list"), GOOGLE_LIST).unwrap();
        assert!(host_mirror_in(dir.path(), "bookworm").is_err());
        fs::write(d.join("debian.sources"), DEBIAN_SOURCES).unwrap();
        fs::write(
            dir.path().join("sources.list"),
            "deb http://local.example/debian bookworm main\n",
        )
        .unwrap();
        assert_eq!(
            host_mirror_in(dir.path(), "bookworm").unwrap(),
            "http://deb.debian.org/debian"
        );
    }

    #[test]
    fn validates_mirror_urls() {
        assert_eq!(
            validate_mirror("http://deb.debian.org/debian/").unwrap(),
            "http://deb.debian.org/debian"
        );
        assert!(validate_mirror("https://m.example:8443/debian").is_ok());
        assert!(validate_mirror("file:/srv/mirror/debian").is_ok());
        for bad in [
            "",
            "deb.debian.org/debian",
            "ftp2://x/y",
            "http://",
            "http:///debian",
            "http://a b/debian",
            "file:relative",
            "mirror+file:///etc/apt/mirrors/debian.list",
        ] {
            let err = validate_mirror(bad).unwrap_err();
            assert_eq!(err.kind(), cubicle_core::ErrorKind::InvalidInput, "{bad}");
        }
    }
}
