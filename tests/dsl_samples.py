"""DSL code used by the compiler tests (kept in a module so errors carry real file:line)."""

from helperfw import Array, Ptr, function, i8, i16, i32, struct, u8, u16, u32, u64, v128


@struct
class Inner:
    a: u8
    b: u64


@struct
class Mixed:
    """Every padding rule at once: small after large, nested struct, arrays, tail padding."""

    tag: u8
    count: u32
    inner: Inner
    half: i16
    bytes_: Array[u8, 3]
    words: Array[u32, 5]
    ptr: Ptr[Inner]
    block: v128
    last: i8


@struct(packed=True)
class Packed:
    tag: u8
    value: u64
    small: u16
    arr: Array[i32, 3]


@function(abi="c")
def sum_words(m: Ptr[Mixed]) -> u64:
    s: u64 = 0
    for i in range(5):
        s += u64(m.words[i])
    return s + u64(m.inner.b) + u64(m.tag)


@function(abi="c")
def touch_packed(p: Ptr[Packed]) -> u64:
    p.arr[2] = -7
    p.small = p.small + 1
    return p.value


@function(abi="c")
def entry_like(x: u64) -> u32:
    return u32(x) + 1
