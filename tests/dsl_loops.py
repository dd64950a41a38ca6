from helperfw import Ptr, function, u8, u64


@function(abi="c")
def zero_page(p: Ptr[u8]) -> None:
    for i in range(4096):
        p[i] = 0


@function(abi="c")
def copy_page(dst: Ptr[u64], src: Ptr[u64]) -> None:
    for i in range(512):
        dst[i] = src[i]
