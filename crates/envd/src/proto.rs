//! Messages of the envd `process.Process` and `filesystem.Filesystem` services in their
//! proto3 JSON form, as the E2B SDKs send and expect them: camelCase field names
//! (snake_case accepted), `oneof`s as single-key objects, `bytes` as base64, `int64` as
//! strings, enums by full name (numbers accepted), defaults omitted.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `bytes` fields: standard base64 with padding out; padded, unpadded or URL-safe in.
pub mod b64 {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Encodes bytes as standard padded base64.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    /// Decodes any of the four common base64 alphabets/paddings.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).map_err(serde::de::Error::custom)
    }

    /// Decodes any of the four common base64 alphabets/paddings.
    pub fn decode(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
        STANDARD
            .decode(s)
            .or_else(|_| STANDARD_NO_PAD.decode(s))
            .or_else(|_| URL_SAFE.decode(s))
            .or_else(|_| URL_SAFE_NO_PAD.decode(s))
    }
}

/// `int64` fields: written as a JSON string, read from a string or a number.
pub mod int64 {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the number as a string.
    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    /// Reads a string or a number.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            N(i64),
            S(String),
        }
        match Either::deserialize(d)? {
            Either::N(n) => Ok(n),
            Either::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

// ---------------------------------------------------------------------------------------
// process.Process
// ---------------------------------------------------------------------------------------

/// What to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessConfig {
    /// Executable (looked up in `PATH`).
    pub cmd: String,
    /// Arguments after the executable.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables (win over the sandbox's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub envs: BTreeMap<String, String>,
    /// Working directory (absolute, or relative to the user's home).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// Selects a running process by pid or tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProcessSelector {
    /// By pid (as seen inside the sandbox).
    Pid(u32),
    /// By the tag given at start.
    Tag(String),
}

/// Terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Columns.
    #[serde(default)]
    pub cols: u32,
    /// Rows.
    #[serde(default)]
    pub rows: u32,
}

/// Pseudo-terminal request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pty {
    /// Its size.
    pub size: PtySize,
}

/// `Start` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartRequest {
    /// What to run.
    pub process: ProcessConfig,
    /// Run under a pseudo-terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
    /// A tag to find the process by later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Keep stdin open (default true for old clients; the SDK sends false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<bool>,
}

impl StartRequest {
    /// `/bin/bash -l -c <command>` without stdin: what the E2B SDK's `commands.run`
    /// sends.
    pub fn shell(command: impl Into<String>) -> Self {
        StartRequest {
            process: ProcessConfig {
                cmd: "/bin/bash".into(),
                args: vec!["-l".into(), "-c".into(), command.into()],
                ..Default::default()
            },
            stdin: Some(false),
            ..Default::default()
        }
    }
}

/// One event of a process stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProcessEvent {
    /// The process started.
    Start {
        /// Its pid inside the sandbox.
        pid: u32,
    },
    /// Output.
    Data(DataEvent),
    /// The process ended.
    End(EndEvent),
    /// Nothing happened for a while.
    Keepalive {},
}

/// Output of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DataEvent {
    /// Bytes from stdout.
    Stdout(#[serde(with = "b64")] Vec<u8>),
    /// Bytes from stderr.
    Stderr(#[serde(with = "b64")] Vec<u8>),
    /// Bytes from the pseudo-terminal.
    Pty(#[serde(with = "b64")] Vec<u8>),
}

/// How a process ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndEvent {
    /// Exit code; -1 when killed by a signal. Omitted when 0 (proto3).
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub exit_code: i32,
    /// Whether it exited (false: signalled).
    #[serde(default, skip_serializing_if = "is_false")]
    pub exited: bool,
    /// `"exit status N"` or `"signal: killed"`.
    #[serde(default)]
    pub status: String,
    /// Set when the process failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `Start` and `Connect` stream message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStreamMessage {
    /// The event.
    pub event: ProcessEvent,
}

/// `Connect` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// Which process.
    pub process: ProcessSelector,
}

/// A running process, as `List` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessInfo {
    /// How it was started.
    pub config: ProcessConfig,
    /// Its pid.
    pub pid: u32,
    /// Its tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// `List` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse {
    /// Running processes.
    #[serde(default)]
    pub processes: Vec<ProcessInfo>,
}

/// Input for a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProcessInput {
    /// Bytes for stdin.
    Stdin(#[serde(with = "b64")] Vec<u8>),
    /// Bytes for the pseudo-terminal.
    Pty(#[serde(with = "b64")] Vec<u8>),
}

/// `SendInput` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendInputRequest {
    /// Which process.
    pub process: ProcessSelector,
    /// What to send.
    pub input: ProcessInput,
}

/// One message of the `StreamInput` client stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StreamInputRequest {
    /// First message: which process.
    Start {
        /// Which process.
        process: ProcessSelector,
    },
    /// Input.
    Data {
        /// What to send.
        input: ProcessInput,
    },
    /// Nothing to send for now.
    Keepalive {},
}

/// Signals `SendSignal` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `SIGNAL_UNSPECIFIED` (0).
    Unspecified,
    /// `SIGNAL_SIGTERM` (15).
    Sigterm,
    /// `SIGNAL_SIGKILL` (9).
    Sigkill,
}

impl Serialize for Signal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Signal::Unspecified => "SIGNAL_UNSPECIFIED",
            Signal::Sigterm => "SIGNAL_SIGTERM",
            Signal::Sigkill => "SIGNAL_SIGKILL",
        })
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match EnumValue::deserialize(d)? {
            EnumValue::Name(n) if n == "SIGNAL_SIGTERM" => Signal::Sigterm,
            EnumValue::Name(n) if n == "SIGNAL_SIGKILL" => Signal::Sigkill,
            EnumValue::Number(15) => Signal::Sigterm,
            EnumValue::Number(9) => Signal::Sigkill,
            _ => Signal::Unspecified,
        })
    }
}

/// A proto3 JSON enum value: its name or its number.
#[derive(Deserialize)]
#[serde(untagged)]
enum EnumValue {
    Number(i64),
    Name(String),
}

/// `SendSignal` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendSignalRequest {
    /// Which process.
    pub process: ProcessSelector,
    /// Which signal.
    #[serde(default = "unspecified_signal")]
    pub signal: Signal,
}

fn unspecified_signal() -> Signal {
    Signal::Unspecified
}

/// `CloseStdin` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseStdinRequest {
    /// Which process.
    pub process: ProcessSelector,
}

/// `Update` request (PTY resize).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRequest {
    /// Which process.
    pub process: ProcessSelector,
    /// New terminal size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
}

/// Empty request or response message (`{}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

// ---------------------------------------------------------------------------------------
// filesystem.Filesystem
// ---------------------------------------------------------------------------------------

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// `FILE_TYPE_UNSPECIFIED` (sockets, devices, fifos).
    Unspecified,
    /// `FILE_TYPE_FILE`.
    File,
    /// `FILE_TYPE_DIRECTORY`.
    Directory,
    /// `FILE_TYPE_SYMLINK`.
    Symlink,
}

impl Serialize for FileType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            FileType::Unspecified => "FILE_TYPE_UNSPECIFIED",
            FileType::File => "FILE_TYPE_FILE",
            FileType::Directory => "FILE_TYPE_DIRECTORY",
            FileType::Symlink => "FILE_TYPE_SYMLINK",
        })
    }
}

impl<'de> Deserialize<'de> for FileType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match EnumValue::deserialize(d)? {
            EnumValue::Name(n) if n == "FILE_TYPE_FILE" => FileType::File,
            EnumValue::Name(n) if n == "FILE_TYPE_DIRECTORY" => FileType::Directory,
            EnumValue::Name(n) if n == "FILE_TYPE_SYMLINK" => FileType::Symlink,
            EnumValue::Number(1) => FileType::File,
            EnumValue::Number(2) => FileType::Directory,
            EnumValue::Number(3) => FileType::Symlink,
            _ => FileType::Unspecified,
        })
    }
}

/// A file, directory or symlink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryInfo {
    /// Base name.
    pub name: String,
    /// Kind.
    #[serde(rename = "type")]
    pub file_type: FileType,
    /// Absolute path.
    pub path: String,
    /// Size in bytes.
    #[serde(with = "int64")]
    pub size: i64,
    /// Permission bits (`st_mode & 0o777`, of the target for a symlink), as envd sends them.
    pub mode: u32,
    /// `ls -l` style permissions, e.g. `-rw-r--r--`.
    pub permissions: String,
    /// Owner's user name (or uid).
    pub owner: String,
    /// Group name (or gid).
    pub group: String,
    /// Last modification, RFC 3339.
    pub modified_time: String,
    /// Target of a symlink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
    /// Whether the entry is a symlink.
    #[serde(default, skip_serializing_if = "is_false")]
    pub is_symlink: bool,
    /// Extended-attribute metadata (`user.e2b.*`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// A request naming one path (`Stat`, `MakeDir`, `Remove`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRequest {
    /// The path.
    #[serde(default)]
    pub path: String,
}

/// A response carrying one entry (`Stat`, `MakeDir`, `Move`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryResponse {
    /// The entry.
    pub entry: EntryInfo,
}

/// `Move` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRequest {
    /// From.
    #[serde(default)]
    pub source: String,
    /// To.
    #[serde(default)]
    pub destination: String,
}

/// `ListDir` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListDirRequest {
    /// The directory.
    #[serde(default)]
    pub path: String,
    /// How many levels (0 or absent = 1).
    #[serde(default)]
    pub depth: u32,
}

/// `ListDir` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListDirResponse {
    /// The entries (not the directory itself).
    #[serde(default)]
    pub entries: Vec<EntryInfo>,
}

/// `WatchDir` and `CreateWatcher` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchRequest {
    /// The directory.
    #[serde(default)]
    pub path: String,
    /// Include subdirectories.
    #[serde(default)]
    pub recursive: bool,
    /// Attach the entry's info to events.
    #[serde(default, alias = "include_entry")]
    pub include_entry: bool,
    /// Allow watching network mounts (accepted, no effect here).
    #[serde(default, alias = "allow_network_mounts")]
    pub allow_network_mounts: bool,
}

/// Kind of a filesystem event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// `EVENT_TYPE_CREATE`.
    Create,
    /// `EVENT_TYPE_WRITE`.
    Write,
    /// `EVENT_TYPE_REMOVE`.
    Remove,
    /// `EVENT_TYPE_RENAME`.
    Rename,
    /// `EVENT_TYPE_CHMOD`.
    Chmod,
    /// `EVENT_TYPE_UNSPECIFIED`.
    Unspecified,
}

impl Serialize for EventType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            EventType::Create => "EVENT_TYPE_CREATE",
            EventType::Write => "EVENT_TYPE_WRITE",
            EventType::Remove => "EVENT_TYPE_REMOVE",
            EventType::Rename => "EVENT_TYPE_RENAME",
            EventType::Chmod => "EVENT_TYPE_CHMOD",
            EventType::Unspecified => "EVENT_TYPE_UNSPECIFIED",
        })
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match EnumValue::deserialize(d)? {
            EnumValue::Name(n) => match n.as_str() {
                "EVENT_TYPE_CREATE" => EventType::Create,
                "EVENT_TYPE_WRITE" => EventType::Write,
                "EVENT_TYPE_REMOVE" => EventType::Remove,
                "EVENT_TYPE_RENAME" => EventType::Rename,
                "EVENT_TYPE_CHMOD" => EventType::Chmod,
                _ => EventType::Unspecified,
            },
            EnumValue::Number(1) => EventType::Create,
            EnumValue::Number(2) => EventType::Write,
            EnumValue::Number(3) => EventType::Remove,
            EnumValue::Number(4) => EventType::Rename,
            EnumValue::Number(5) => EventType::Chmod,
            EnumValue::Number(_) => EventType::Unspecified,
        })
    }
}

/// Something happened in a watched directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesystemEvent {
    /// Path relative to the watched directory.
    pub name: String,
    /// What happened.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// The entry, when asked for and still there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryInfo>,
}

/// `WatchDir` stream message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WatchDirResponse {
    /// First message: the watch is in place.
    Start {},
    /// An event.
    Filesystem(Box<FilesystemEvent>),
    /// Nothing happened for a while.
    Keepalive {},
}

/// `CreateWatcher` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateWatcherResponse {
    /// Id for the other watcher calls.
    #[serde(alias = "watcher_id")]
    pub watcher_id: String,
}

/// `GetWatcherEvents` and `RemoveWatcher` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatcherRequest {
    /// The watcher.
    #[serde(default, alias = "watcher_id")]
    pub watcher_id: String,
}

/// `GetWatcherEvents` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetWatcherEventsResponse {
    /// Events since the previous call.
    #[serde(default)]
    pub events: Vec<FilesystemEvent>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn start_request_as_the_sdk_sends_it() {
        let req: StartRequest = serde_json::from_value(json!({
            "process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"], "envs": {"A": "1"}, "cwd": "/tmp"},
            "stdin": false
        }))
        .unwrap();
        assert_eq!(req.process.args[2], "echo hi");
        assert_eq!(req.process.envs["A"], "1");
        assert_eq!(req.stdin, Some(false));
        assert!(req.pty.is_none());
        let pty: StartRequest = serde_json::from_value(json!({
            "process": {"cmd": "/bin/bash"}, "pty": {"size": {"cols": 80, "rows": 24}}, "tag": "t"
        }))
        .unwrap();
        assert_eq!(pty.pty.unwrap().size, PtySize { cols: 80, rows: 24 });
    }

    #[test]
    fn events_serialise_like_envd() {
        let start = ProcessStreamMessage {
            event: ProcessEvent::Start { pid: 7 },
        };
        assert_eq!(
            serde_json::to_value(&start).unwrap(),
            json!({"event": {"start": {"pid": 7}}})
        );
        let data = ProcessStreamMessage {
            event: ProcessEvent::Data(DataEvent::Stdout(b"hi\n".to_vec())),
        };
        assert_eq!(
            serde_json::to_value(&data).unwrap(),
            json!({"event": {"data": {"stdout": "aGkK"}}})
        );
        let ok = EndEvent {
            exit_code: 0,
            exited: true,
            status: "exit status 0".into(),
            error: None,
        };
        assert_eq!(
            serde_json::to_value(ProcessEvent::End(ok)).unwrap(),
            json!({"end": {"exited": true, "status": "exit status 0"}})
        );
        let killed = EndEvent {
            exit_code: -1,
            exited: false,
            status: "signal: killed".into(),
            error: Some("signal: killed".into()),
        };
        assert_eq!(
            serde_json::to_value(ProcessEvent::End(killed)).unwrap(),
            json!({"end": {"exitCode": -1, "status": "signal: killed", "error": "signal: killed"}})
        );
        assert_eq!(
            serde_json::to_value(ProcessEvent::Keepalive {}).unwrap(),
            json!({"keepalive": {}})
        );
    }

    #[test]
    fn selectors_signals_and_inputs() {
        let r: SendSignalRequest =
            serde_json::from_value(json!({"process": {"pid": 3}, "signal": "SIGNAL_SIGKILL"}))
                .unwrap();
        assert_eq!(r.process, ProcessSelector::Pid(3));
        assert_eq!(r.signal, Signal::Sigkill);
        let r: SendSignalRequest =
            serde_json::from_value(json!({"process": {"tag": "x"}, "signal": 15})).unwrap();
        assert_eq!(r.signal, Signal::Sigterm);
        let r: SendInputRequest =
            serde_json::from_value(json!({"process": {"pid": 1}, "input": {"stdin": "aGk"}}))
                .unwrap();
        assert_eq!(r.input, ProcessInput::Stdin(b"hi".to_vec()));
        let s: StreamInputRequest =
            serde_json::from_value(json!({"start": {"process": {"pid": 9}}})).unwrap();
        assert_eq!(
            s,
            StreamInputRequest::Start {
                process: ProcessSelector::Pid(9)
            }
        );
    }

    #[test]
    fn entry_info_uses_proto3_json() {
        let e = EntryInfo {
            name: "a".into(),
            file_type: FileType::File,
            path: "/a".into(),
            size: 12,
            mode: 0o100644,
            permissions: "-rw-r--r--".into(),
            owner: "user".into(),
            group: "user".into(),
            modified_time: "2025-01-01T00:00:00Z".into(),
            symlink_target: None,
            is_symlink: false,
            metadata: BTreeMap::new(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["size"], "12");
        assert_eq!(v["modifiedTime"], "2025-01-01T00:00:00Z");
        let back: EntryInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        let w: WatchRequest =
            serde_json::from_value(json!({"path": "/x", "recursive": true, "include_entry": true}))
                .unwrap();
        assert!(w.recursive && w.include_entry);
    }
}
