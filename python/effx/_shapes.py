"""Shape arithmetic shared by the fake kernels and the Python wrappers (mirrors
include/effx/quant.h)."""


def quant_codes_per_word(bits: int) -> int:
    """Codes of ``bits`` bits in one int32 word."""
    return 32 // bits


def quant_words_per_row(cols: int, bits: int) -> int:
    """int32 words holding ``cols`` codes of ``bits`` bits; each row starts on a new word."""
    per_word = quant_codes_per_word(bits)
    return (cols + per_word - 1) // per_word
