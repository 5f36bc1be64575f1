//! GGUF metadata values: the thirteen value types of the GGUF specification (ggml `docs/gguf.md`,
//! `enum gguf_metadata_value_type`), with their on-disk type ids and encoded sizes.

/// One metadata value of a GGUF file.
///
/// Arrays hold values of one type each (the file stores the element type once); they may nest.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF value type ids, as stored in the file.
pub(crate) mod type_id {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The fewest bytes one value of type `id` occupies in a file (a string's or an array's header alone),
/// or `None` for an id the specification does not define. Bounds element counts before allocating.
pub(crate) fn min_encoded_size(id: u32) -> Option<usize> {
    match id {
        type_id::U8 | type_id::I8 | type_id::BOOL => Some(1),
        type_id::U16 | type_id::I16 => Some(2),
        type_id::U32 | type_id::I32 | type_id::F32 => Some(4),
        type_id::U64 | type_id::I64 | type_id::F64 => Some(8),
        // u64 length prefix
        type_id::STRING => Some(8),
        // u32 element type + u64 count
        type_id::ARRAY => Some(12),
        _ => None,
    }
}

impl GgufValue {
    /// The value as an unsigned integer: any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float: any float or integer type (64-bit integers beyond 2^53 round).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            Self::U8(v) => Some(v.into()),
            Self::I8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::U64(v) => Some(v as f64),
            Self::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as text, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The type's name as the GGUF specification spells it (`uint32`, `string`, `array`, ...), for
    /// messages.
    pub fn type_name(&self) -> &'static str {
        type_name_of(self.type_id()).unwrap_or("unknown")
    }

    /// The type id this value is stored under in a file.
    pub fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => type_id::U8,
            Self::I8(_) => type_id::I8,
            Self::U16(_) => type_id::U16,
            Self::I16(_) => type_id::I16,
            Self::U32(_) => type_id::U32,
            Self::I32(_) => type_id::I32,
            Self::F32(_) => type_id::F32,
            Self::Bool(_) => type_id::BOOL,
            Self::String(_) => type_id::STRING,
            Self::Array(_) => type_id::ARRAY,
            Self::U64(_) => type_id::U64,
            Self::I64(_) => type_id::I64,
            Self::F64(_) => type_id::F64,
        }
    }
}

/// The specification's name of value type `id`, or `None` if it defines no such type.
pub(crate) fn type_name_of(id: u32) -> Option<&'static str> {
    const NAMES: [&str; 13] = [
        "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string", "array",
        "uint64", "int64", "float64",
    ];
    NAMES.get(usize::try_from(id).ok()?).copied()
}

impl From<&str> for GgufValue {
    fn from(s: &str) -> Self {
        Self::String(s.to_owned())
    }
}

impl From<String> for GgufValue {
    fn from(s: String) -> Self {
        Self::String(s)
    }
}

impl From<u32> for GgufValue {
    fn from(v: u32) -> Self {
        Self::U32(v)
    }
}

impl From<f32> for GgufValue {
    fn from(v: f32) -> Self {
        Self::F32(v)
    }
}

impl From<bool> for GgufValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}
