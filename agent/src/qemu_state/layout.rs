//! VMState layouts as data: each body the image decodes is described field by field the way
//! QEMU's VMDESCRIPTION JSON describes it (name, type, element size, array length, nested
//! structs), so a test can hold the description against the JSON of a real stream.
//!
//! A body with a zerocopy mirror (the `*Wire` structs) builds its table with `vm_field!`:
//! offset from `offset_of!`, type and size from the member's Rust type. A compile-time check
//! ([`VmStruct::lays_out`]) then proves that the table lists every member in order with no
//! gap, so "the table matches the JSON" implies "the mirror matches the stream". Subsections,
//! which are read by table alone, get their offsets from `seq`.

use core::fmt;

use zerocopy::byteorder::big_endian::{I32, I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The VMState type of a field, as QEMU's `VMStateInfo` (or struct flag) names it.
#[derive(Clone, Copy, Debug)]
pub enum VmKind {
    /// `uint8`.
    Uint8,
    /// `uint16`.
    Uint16,
    /// `uint32`.
    Uint32,
    /// `uint64`.
    Uint64,
    /// `int32`.
    Int32,
    /// `int64`.
    Int64,
    /// `bool` (one byte).
    Bool,
    /// `unused_buffer` (`VMSTATE_UNUSED`: bytes sent and ignored).
    Unused,
    /// `struct`: a nested description (`VMSTATE_STRUCT*`).
    Struct(&'static VmStruct),
    /// `tmp`: a nested description written through a temporary (`VMSTATE_WITH_TMP`).
    Tmp(&'static VmStruct),
}

impl VmKind {
    /// The `type` string of the VMDESCRIPTION JSON.
    pub const fn json_type(&self) -> &'static str {
        match self {
            Self::Uint8 => "uint8",
            Self::Uint16 => "uint16",
            Self::Uint32 => "uint32",
            Self::Uint64 => "uint64",
            Self::Int32 => "int32",
            Self::Int64 => "int64",
            Self::Bool => "bool",
            Self::Unused => "unused_buffer",
            Self::Struct(_) => "struct",
            Self::Tmp(_) => "tmp",
        }
    }

    /// Bytes of one scalar element (0 for nested and unused kinds, whose size is their own).
    const fn scalar_size(&self) -> usize {
        match self {
            Self::Uint8 | Self::Bool => 1,
            Self::Uint16 => 2,
            Self::Uint32 | Self::Int32 => 4,
            Self::Uint64 | Self::Int64 => 8,
            Self::Unused | Self::Struct(_) | Self::Tmp(_) => 0,
        }
    }
}

/// One field of a VMState description.
#[derive(Clone, Copy, Debug)]
pub struct VmField {
    /// The name in the JSON (QEMU adds `[n]` to a name used twice in one description).
    pub name: &'static str,
    /// The type.
    pub kind: VmKind,
    /// Bytes of one element (the JSON's `size`).
    pub size: usize,
    /// `Some(n)` for an array (the JSON's `array_len`).
    pub count: Option<usize>,
    /// Offset of the field in the body.
    pub offset: usize,
}

impl VmField {
    /// Bytes of the whole field on the wire.
    pub const fn len(&self) -> usize {
        match self.count {
            Some(n) => self.size * n,
            None => self.size,
        }
    }

    /// Whether the field takes no bytes.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A mirrored member: `member` only carries its type (see [`vm_field!`]).
    pub(crate) const fn of<S, T: VmWire>(name: &'static str, offset: usize, _member: fn(&S) -> &T) -> Self {
        Self { name, kind: T::KIND, size: T::SIZE, count: T::COUNT, offset }
    }

    /// A scalar of a table-only description; [`seq`] sets the offset.
    pub(crate) const fn scalar(name: &'static str, kind: VmKind) -> Self {
        Self { name, kind, size: kind.scalar_size(), count: None, offset: 0 }
    }

    /// An array of scalars of a table-only description.
    pub(crate) const fn array(name: &'static str, kind: VmKind, n: usize) -> Self {
        Self { name, kind, size: kind.scalar_size(), count: Some(n), offset: 0 }
    }

    /// An array of nested structs of a table-only description.
    pub(crate) const fn structs(name: &'static str, vmsd: &'static VmStruct, n: usize) -> Self {
        Self { name, kind: VmKind::Struct(vmsd), size: vmsd.size(), count: Some(n), offset: 0 }
    }
}

/// A VMState description (`VMStateDescription`): its name, version and fields in order.
#[derive(Debug)]
pub struct VmStruct {
    /// `vmsd_name` (for a subsection, `parent/name`, the name on the wire).
    pub name: &'static str,
    /// The version the source writes (the JSON's `version`; 0 when QEMU sets none).
    pub version: u32,
    /// The fields.
    pub fields: &'static [VmField],
}

impl VmStruct {
    /// Bytes of the fields.
    pub const fn size(&self) -> usize {
        let mut total = 0;
        let mut i = 0;
        while i < self.fields.len() {
            total += self.fields[i].len();
            i += 1;
        }
        total
    }

    /// Index of the field holding byte `offset` of the body (the last field if past it).
    pub const fn field_at(&self, offset: usize) -> usize {
        let mut i = 0;
        while i + 1 < self.fields.len() {
            let f = &self.fields[i];
            if offset < f.offset + f.len() {
                return i;
            }
            i += 1;
        }
        i
    }

    /// Whether the fields follow each other from offset 0 with no gap and end at `size`,
    /// nested descriptions included (checked at compile time against `size_of` the mirror).
    pub const fn lays_out(&self, size: usize) -> bool {
        let mut at = 0;
        let mut i = 0;
        while i < self.fields.len() {
            let f = &self.fields[i];
            let nested_ok = match f.kind {
                VmKind::Struct(s) | VmKind::Tmp(s) => s.lays_out(f.size),
                VmKind::Unused => true,
                _ => f.size == f.kind.scalar_size(),
            };
            if !nested_ok || f.offset != at {
                return false;
            }
            at += f.len();
            i += 1;
        }
        at == size
    }
}

/// Sets the offsets of a table-only description, field after field.
pub(crate) const fn seq<const N: usize>(mut fields: [VmField; N]) -> [VmField; N] {
    let mut at = 0;
    let mut i = 0;
    while i < N {
        fields[i].offset = at;
        at += fields[i].len();
        i += 1;
    }
    fields
}

/// A Rust type that mirrors one VMState element.
pub trait VmElem {
    /// Its VMState type.
    const KIND: VmKind;
}

/// A mirrored member: one element or an array of them.
pub trait VmWire {
    /// Type of an element.
    const KIND: VmKind;
    /// Bytes of an element.
    const SIZE: usize;
    /// Array length, if an array.
    const COUNT: Option<usize>;
}

impl<T: VmElem> VmWire for T {
    const KIND: VmKind = T::KIND;
    const SIZE: usize = core::mem::size_of::<T>();
    const COUNT: Option<usize> = None;
}

impl<T: VmElem, const N: usize> VmWire for [T; N] {
    const KIND: VmKind = T::KIND;
    const SIZE: usize = core::mem::size_of::<T>();
    const COUNT: Option<usize> = Some(N);
}

impl VmElem for u8 {
    const KIND: VmKind = VmKind::Uint8;
}
impl VmElem for U16 {
    const KIND: VmKind = VmKind::Uint16;
}
impl VmElem for U32 {
    const KIND: VmKind = VmKind::Uint32;
}
impl VmElem for U64 {
    const KIND: VmKind = VmKind::Uint64;
}
impl VmElem for I32 {
    const KIND: VmKind = VmKind::Int32;
}
impl VmElem for I64 {
    const KIND: VmKind = VmKind::Int64;
}

/// `VMSTATE_UNUSED(N)`: N bytes the source sends and the destination ignores.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(transparent)]
pub struct Unused<const N: usize>(pub [u8; N]);

impl<const N: usize> VmElem for Unused<N> {
    const KIND: VmKind = VmKind::Unused;
}

/// The table entry of member `$m` of mirror `$S`, named `$name` as in QEMU's JSON.
macro_rules! vm_field {
    ($S:ty, $name:literal, $m:ident) => {
        $crate::qemu_state::layout::VmField::of::<$S, _>($name, core::mem::offset_of!($S, $m), |s| &s.$m)
    };
}
pub(crate) use vm_field;

/// A field of a description the image decodes, for errors: which description (its place in
/// `qemu_state`'s list of them) and which of its fields. Two bytes, so [`crate::Field`]
/// stays small; its Debug form looks the names up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VmFieldRef {
    vmsd: u8,
    field: u8,
}

impl VmFieldRef {
    /// `field` value naming a subsection's header (its name and version), not a field.
    const HEADER: u8 = u8::MAX;

    /// Field `index` of `vmsd`.
    pub(crate) fn field(vmsd: &'static VmStruct, index: usize) -> Self {
        Self { vmsd: Self::place(vmsd), field: u8::try_from(index).unwrap_or(Self::HEADER) }
    }

    /// The header of a subsection of `vmsd` (`vmsd` itself when the name is not known yet).
    pub(crate) fn header(vmsd: &'static VmStruct) -> Self {
        Self { vmsd: Self::place(vmsd), field: Self::HEADER }
    }

    fn place(vmsd: &'static VmStruct) -> u8 {
        let at = super::DESCRIPTIONS.iter().position(|d| core::ptr::eq(*d, vmsd));
        at.and_then(|i| u8::try_from(i).ok()).unwrap_or(u8::MAX)
    }

    /// The description.
    pub fn vmsd(&self) -> Option<&'static VmStruct> {
        super::DESCRIPTIONS.get(usize::from(self.vmsd)).copied()
    }

    /// The field (`None` for a subsection header).
    pub fn vm_field(&self) -> Option<&'static VmField> {
        self.vmsd()?.fields.get(usize::from(self.field))
    }
}

impl fmt::Debug for VmFieldRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vmsd = self.vmsd().map_or("?", |d| d.name);
        match self.vm_field() {
            Some(field) => write!(f, "{vmsd}.{}", field.name),
            None => write!(f, "{vmsd} (subsection header)"),
        }
    }
}
