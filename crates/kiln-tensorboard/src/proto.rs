//! The protobuf messages TensorBoard reads, as far as kiln writes them: TensorFlow's
//! `core/util/event.proto` (`Event`, `SessionLog`), `core/framework/summary.proto` (`Summary`,
//! `SummaryMetadata`), `tensor.proto` (`TensorProto`, strings only) and the hparams plugin's
//! `plugin_data.proto` (`HParamsPluginData`, `SessionStartInfo`, with `google.protobuf.Value`),
//! with their field numbers.

use std::collections::BTreeMap;

/// One record of an event file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// "brain.Event:2", the file's first record.
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    /// 1 = START: the reader drops the points at or past this event's step logged before it.
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(string, tag = "2")]
    pub checkpoint_path: String,
    #[prost(string, tag = "3")]
    pub msg: String,
}

pub const SESSION_START: i32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    #[prost(oneof = "Content", tags = "2, 8")]
    pub content: Option<Content>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Content {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
    /// `DataClass`: 2 = TENSOR (text and hparams are tensor time series).
    #[prost(int32, tag = "4")]
    pub data_class: i32,
}

pub const DATA_CLASS_TENSOR: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// 7 = DT_STRING.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

pub const DT_STRING: i32 = 7;

impl Value {
    /// A scalar point (`simple_value`, read by TensorBoard's scalars dashboard).
    pub fn scalar(tag: impl Into<String>, value: f64) -> Self {
        Self { tag: tag.into(), metadata: None, content: Some(Content::SimpleValue(value as f32)) }
    }

    /// Text for TensorBoard's text dashboard (a scalar string tensor with the "text" plugin;
    /// markdown).
    pub fn text(tag: impl Into<String>, text: &str) -> Self {
        Self::tensor(tag, "text", Vec::new(), text)
    }

    /// The hyperparameters of the run for TensorBoard's HParams tab: the plugin's
    /// `session_start_info` (the plugin reads only the metadata; the value is an empty string).
    pub fn hparams(hparams: BTreeMap<String, HParam>, start_time_secs: f64) -> Self {
        let hparams = hparams.into_iter().map(|(k, v)| (k, v.into())).collect();
        let data = HParamsPluginData { version: 0, session_start_info: Some(SessionStartInfo { hparams, group_name: String::new(), start_time_secs }) };
        Self::tensor("_hparams_/session_start_info", "hparams", prost::Message::encode_to_vec(&data), "")
    }

    fn tensor(tag: impl Into<String>, plugin: &str, content: Vec<u8>, text: &str) -> Self {
        Self {
            tag: tag.into(),
            metadata: Some(SummaryMetadata { plugin_data: Some(PluginData { plugin_name: plugin.into(), content }), data_class: DATA_CLASS_TENSOR }),
            content: Some(Content::Tensor(TensorProto { dtype: DT_STRING, tensor_shape: Some(TensorShape { dim: Vec::new() }), string_val: vec![text.as_bytes().to_vec()] })),
        }
    }
}

/// A hyperparameter's value.
#[derive(Debug, Clone, PartialEq)]
pub enum HParam {
    Number(f64),
    Text(String),
    Bool(bool),
}

/// The hparams plugin's data (`tensorboard/plugins/hparams/plugin_data.proto`), the
/// `session_start_info` case of its `data` oneof only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HParamsPluginData {
    #[prost(int32, tag = "1")]
    pub version: i32,
    #[prost(message, optional, tag = "3")]
    pub session_start_info: Option<SessionStartInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionStartInfo {
    #[prost(btree_map = "string, message", tag = "1")]
    pub hparams: BTreeMap<String, PbValue>,
    #[prost(string, tag = "4")]
    pub group_name: String,
    #[prost(double, tag = "5")]
    pub start_time_secs: f64,
}

/// `google.protobuf.Value`, its number, string and bool cases.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PbValue {
    #[prost(oneof = "PbKind", tags = "2, 3, 4")]
    pub kind: Option<PbKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PbKind {
    #[prost(double, tag = "2")]
    Number(f64),
    #[prost(string, tag = "3")]
    Text(String),
    #[prost(bool, tag = "4")]
    Bool(bool),
}

impl From<HParam> for PbValue {
    fn from(v: HParam) -> Self {
        Self {
            kind: Some(match v {
                HParam::Number(x) => PbKind::Number(x),
                HParam::Text(s) => PbKind::Text(s),
                HParam::Bool(b) => PbKind::Bool(b),
            }),
        }
    }
}
