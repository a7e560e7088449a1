//! The JSON dialect's wire format: what a client's line asks for (`parse`), the frames a
//! connection writes (`ServerFrame`), and the error codes of both.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::chat::command::StoredMessage;
use crate::chat::service::ChatError;

/// Longest message id a client may choose, in bytes.
const MAX_ID_BYTES: usize = 128;

/// Whether a message id is one a client may choose (both ways of reading a `send` ask it).
fn id_allowed(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    MissingField,
    BadName,
    LineTooLong,
    NotLoggedIn,
    NameTaken,
    RateLimited,
    BadEncoding,
    Unavailable,
    NotMember,
    Internal,
    Slow,
    Limit,
    AuthRequired,
    AuthFailed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::BadName => "bad_name",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::NotLoggedIn => "not_logged_in",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::Slow => "slow",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BadEncoding => "bad_encoding",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotMember => "not_member",
            ErrorCode::Internal => "internal",
            ErrorCode::Limit => "limit",
            ErrorCode::AuthRequired => "auth_required",
            ErrorCode::AuthFailed => "auth_failed",
        }
    }
}

/// A request that could not be served, as the client will see it.
#[derive(Debug)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    pub id: Option<String>,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
            id: None,
        }
    }
}

impl From<ChatError> for ProtocolError {
    fn from(e: ChatError) -> Self {
        let code = match &e {
            ChatError::BadName(_) | ChatError::NoSuchUser(_) => ErrorCode::BadName,
            ChatError::NameTaken(_) => ErrorCode::NameTaken,
            ChatError::NotMember(_) => ErrorCode::NotMember,
            ChatError::UnknownSession => ErrorCode::NotLoggedIn,
            ChatError::Unavailable(_) => ErrorCode::Unavailable,
            ChatError::Internal(_) => ErrorCode::Internal,
            ChatError::Limit { .. } => ErrorCode::Limit,
            ChatError::AuthRequired => ErrorCode::AuthRequired,
            ChatError::AuthFailed => ErrorCode::AuthFailed,
        };
        ProtocolError::new(code, e.to_string())
    }
}

#[derive(Debug, PartialEq)]
pub enum ClientRequest {
    Hello {
        user: String,
        session: Option<String>,
        resume_from: Option<u64>,
        password: Option<String>,
        /// False: the session's own messages are not pushed back to it live.
        echo: bool,
    },
    Join {
        room: String,
    },
    Leave {
        room: String,
    },
    Send {
        to: String,
        id: String,
        text: String,
    },
    History {
        room: String,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
    },
    Who {
        room: String,
    },
    Ping,
}

fn field_str(v: &Value, name: &str) -> Result<String, ProtocolError> {
    match v.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::BadJson,
            format!("field `{name}` must be a string"),
        )),
        None => Err(ProtocolError::new(
            ErrorCode::MissingField,
            format!("missing field `{name}`"),
        )),
    }
}

fn opt_str(v: &Value, name: &str) -> Result<Option<String>, ProtocolError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => field_str(v, name).map(Some),
    }
}

fn opt_bool(v: &Value, name: &str) -> Result<Option<bool>, ProtocolError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::BadJson,
            format!("field `{name}` must be true or false"),
        )),
    }
}

fn opt_u64(v: &Value, name: &str) -> Result<Option<u64>, ProtocolError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::BadJson,
                format!("field `{name}` must be a non-negative integer"),
            )
        }),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::BadJson,
            format!("field `{name}` must be a non-negative integer"),
        )),
    }
}

/// A well-formed `send`, the line a connection reads most: decoded into its fields directly
/// (borrowing what has no escapes), not into a `Value` map first. Anything else, errors
/// included, goes the general way (`parse`), which decides every answer.
#[derive(serde::Deserialize)]
struct SendLine<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    to: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    text: std::borrow::Cow<'a, str>,
}

fn parse_send(line: &str) -> Option<ClientRequest> {
    // Any other request would be read twice; one that spells `send` with escapes still goes
    // the general way.
    if !line.contains("\"send\"") {
        return None;
    }
    let send: SendLine<'_> = serde_json::from_str(line).ok()?;
    (send.kind == "send" && id_allowed(&send.id)).then(|| ClientRequest::Send {
        to: send.to.into_owned(),
        id: send.id.into_owned(),
        text: send.text.into_owned(),
    })
}

/// Parses one line of the JSON dialect.
pub fn parse(line: &str) -> Result<ClientRequest, ProtocolError> {
    if let Some(send) = parse_send(line) {
        return Ok(send);
    }
    let v: Value = serde_json::from_str(line)
        .map_err(|e| ProtocolError::new(ErrorCode::BadJson, format!("invalid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ProtocolError::new(
            ErrorCode::BadJson,
            "expected a JSON object",
        ));
    }
    let kind = field_str(&v, "type")?;
    let request = match kind.as_str() {
        "hello" => ClientRequest::Hello {
            user: field_str(&v, "user")?,
            session: opt_str(&v, "session")?,
            resume_from: opt_u64(&v, "resume_from")?,
            password: opt_str(&v, "password")?,
            echo: opt_bool(&v, "echo")?.unwrap_or(true),
        },
        "join" => ClientRequest::Join {
            room: field_str(&v, "room")?,
        },
        "leave" => ClientRequest::Leave {
            room: field_str(&v, "room")?,
        },
        "send" => {
            let id = field_str(&v, "id").map_err(|mut e| {
                e.id = None;
                e
            })?;
            let with_id = |mut e: ProtocolError| {
                e.id = Some(id.clone());
                e
            };
            let to = field_str(&v, "to").map_err(with_id)?;
            let text = field_str(&v, "text").map_err(with_id)?;
            if !id_allowed(&id) {
                return Err(with_id(ProtocolError::new(
                    ErrorCode::BadJson,
                    format!("field `id` must be 1 to {MAX_ID_BYTES} bytes"),
                )));
            }
            ClientRequest::Send { to, id, text }
        }
        "history" => ClientRequest::History {
            room: field_str(&v, "room")?,
            before: opt_u64(&v, "before")?,
            after: opt_u64(&v, "after")?,
            limit: opt_u64(&v, "limit")?.unwrap_or(100).clamp(1, 1000) as usize,
        },
        "who" => ClientRequest::Who {
            room: field_str(&v, "room")?,
        },
        "ping" => ClientRequest::Ping,
        other => {
            return Err(ProtocolError::new(
                ErrorCode::UnknownType,
                format!("unknown type `{other}`"),
            ));
        }
    };
    Ok(request)
}

#[derive(Serialize)]
pub struct NodeInfo {
    pub id: u64,
    pub chat: String,
    pub healthy: bool,
}

#[derive(Serialize)]
pub struct MessageView<'a> {
    pub index: u64,
    pub to: &'a str,
    pub from: &'a str,
    pub id: &'a str,
    pub text: &'a str,
    pub ts: String,
}

impl<'a> From<&'a StoredMessage> for MessageView<'a> {
    fn from(m: &'a StoredMessage) -> Self {
        MessageView {
            index: m.index,
            to: &m.to,
            from: &m.from,
            id: &m.id,
            text: &m.text,
            ts: rfc3339(m.ts_ms),
        }
    }
}

pub fn rfc3339(ts_ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ts_ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        session: &'a str,
        node: u64,
        leader: Option<u64>,
        commit_index: u64,
        nodes: Vec<NodeInfo>,
        /// How many missed messages follow this welcome (a resumed session's replay).
        replayed: u64,
        /// The session asked for was resumed.
        resumed: bool,
        /// Retention removed some of what the client asked for...
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
        /// ...and this is the oldest index still kept.
        #[serde(skip_serializing_if = "Option::is_none")]
        oldest_index: Option<u64>,
    },
    Joined {
        room: &'a str,
        members: &'a [String],
    },
    Left {
        room: &'a str,
    },
    Ack {
        id: &'a str,
        index: u64,
    },
    History {
        room: &'a str,
        messages: Vec<MessageView<'a>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        oldest_index: Option<u64>,
    },
    Members {
        room: &'a str,
        users: &'a [String],
    },
    Pong,
    Message(MessageView<'a>),
    Presence {
        room: &'a str,
        user: &'a str,
        state: &'static str,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
}

impl ServerFrame<'_> {
    pub fn encode(&self) -> Bytes {
        let mut bytes = serde_json::to_vec(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","code":"internal","message":"encoding failed: {e}"}}"#)
                .into_bytes()
        });
        bytes.push(b'\n');
        Bytes::from(bytes)
    }
}

pub(super) fn error_frame(e: &ProtocolError) -> Bytes {
    ServerFrame::Error {
        code: e.code,
        message: &e.message,
        id: e.id.as_deref(),
    }
    .encode()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_have_codes() {
        assert_eq!(parse("{").unwrap_err().code, ErrorCode::BadJson);
        assert_eq!(parse("[1]").unwrap_err().code, ErrorCode::BadJson);
        assert_eq!(
            parse(r#"{"type":"dance"}"#).unwrap_err().code,
            ErrorCode::UnknownType
        );
        assert_eq!(
            parse(r#"{"type":"join"}"#).unwrap_err().code,
            ErrorCode::MissingField
        );
        assert_eq!(
            parse(r#"{"user":"a"}"#).unwrap_err().code,
            ErrorCode::MissingField
        );
        let e = parse(r##"{"type":"send","id":"7","to":"#r"}"##).unwrap_err();
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ErrorCode::MissingField, Some("7"))
        );
    }

    #[test]
    fn a_send_reads_the_same_on_the_direct_way_and_the_general_one() {
        let general = |line: &str| {
            let v: Value = serde_json::from_str(line).unwrap();
            (
                field_str(&v, "to").unwrap(),
                field_str(&v, "id").unwrap(),
                field_str(&v, "text").unwrap(),
            )
        };
        for line in [
            r##"{"type":"send","id":"7","to":"#r","text":"hi"}"##,
            r##"{"text":"esc \" \\ \n \u00e9 é","to":"#r","id":"a b","type":"send","extra":[1,{"x":2}]}"##,
            r##"{"type":"send","id":"7","to":"bob","text":""}"##,
        ] {
            let Some(ClientRequest::Send { to, id, text }) = parse_send(line) else {
                panic!("not taken directly: {line}");
            };
            assert_eq!((to, id, text), general(line), "{line}");
        }
        // Lines the direct way leaves to the general one, which answers as it always did.
        let long_id = format!(
            r##"{{"type":"send","id":"{}","to":"#r","text":"x"}}"##,
            "i".repeat(129)
        );
        for (line, code) in [
            (
                r##"{"type":"send","id":"","to":"#r","text":"x"}"##,
                ErrorCode::BadJson,
            ),
            (long_id.as_str(), ErrorCode::BadJson),
            (
                r##"{"type":"send","id":"7","to":"#r","text":null}"##,
                ErrorCode::BadJson,
            ),
            (
                r##"{"type":"send","id":"7","to":"#r","text":5}"##,
                ErrorCode::BadJson,
            ),
            (
                r##"{"type":"send","id":"7","to":"#r"}"##,
                ErrorCode::MissingField,
            ),
            (
                r##"{"type":"sned","id":"7","to":"#r","text":"x"}"##,
                ErrorCode::UnknownType,
            ),
        ] {
            assert!(parse_send(line).is_none(), "{line}");
            assert_eq!(parse(line).unwrap_err().code, code, "{line}");
        }
        // Other requests, and a send whose type is escaped, are not read the direct way.
        assert!(parse_send(r##"{"type":"join","room":"#r"}"##).is_none());
        let escaped = r##"{"type":"s\u0065nd","id":"7","to":"#r","text":"x"}"##;
        assert!(parse_send(escaped).is_none());
        assert!(matches!(parse(escaped), Ok(ClientRequest::Send { id, .. }) if id == "7"));
        // A repeated field: the general way keeps the last value, as before.
        let twice = r##"{"type":"send","id":"7","to":"#a","to":"#b","text":"x"}"##;
        assert!(parse_send(twice).is_none());
        assert!(matches!(parse(twice), Ok(ClientRequest::Send { to, .. }) if to == "#b"));
    }

    #[test]
    fn parse_requests() {
        assert_eq!(
            parse(r#"{"type":"hello","user":"a","session":"s","resume_from":4}"#).unwrap(),
            ClientRequest::Hello {
                user: "a".into(),
                session: Some("s".into()),
                resume_from: Some(4),
                password: None,
                echo: true,
            }
        );
        assert_eq!(
            parse(r#"{"type":"hello","user":"a","echo":false}"#).unwrap(),
            ClientRequest::Hello {
                user: "a".into(),
                session: None,
                resume_from: None,
                password: None,
                echo: false,
            }
        );
        assert_eq!(
            parse(r#"{"type":"hello","user":"a","echo":"no"}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadJson
        );
        assert_eq!(
            parse(r##"{"type":"history","room":"#r","limit":5000}"##).unwrap(),
            ClientRequest::History {
                room: "#r".into(),
                before: None,
                after: None,
                limit: 1000
            }
        );
    }

    #[test]
    fn frames_encode_as_one_line() {
        let m = StoredMessage {
            index: 3,
            to: "#r".into(),
            from: "a".into(),
            id: "1".into(),
            text: "hi\nthere".into(),
            ts_ms: 0,
            parties: Vec::new(),
        };
        let line = ServerFrame::Message((&m).into()).encode();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["index"], 3);
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
    }
}
