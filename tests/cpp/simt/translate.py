"""effx SIMT emulator: rewrites a CUDA source into C++ that simt.h can compile. Only the two
constructs C++ cannot parse change: `kernel<<<grid, block, smem, stream>>>(args)` becomes
`::effx::simt::launch(kernel, grid, block, smem, stream)(args)`, and `extern __shared__ T name[];`
becomes a pointer to the launch's dynamic shared memory. Line breaks are kept, so compiler
messages point at the original lines.

    python3 translate.py SRC_DIR OUT_DIR FILE...
"""

import pathlib
import re
import sys

DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;")


def kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression that ends at `end`: a name, maybe with template args."""
    i = end
    if text[i - 1] == ">":
        depth = 0
        while True:
            i -= 1
            depth += {">": 1, "<": -1}.get(text[i], 0)
            if depth == 0:
                break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def translate(text: str) -> str:
    text = DYNAMIC_SHARED.sub(r"\1* \2 = ::effx::simt::dynamic_shared<\1>();", text)
    out, pos = [], 0
    while (open_ := text.find("<<<", pos)) >= 0:
        close = text.find(">>>", open_)
        start = kernel_start(text, open_)
        out.append(text[pos:start])
        out.append(f"::effx::simt::launch({text[start:open_]}, {text[open_ + 3:close]})")
        pos = close + 3
    out.append(text[pos:])
    return "".join(out)


def main() -> None:
    src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[3:]:
        target = dst / (name + ".cpp" if name.endswith(".cu") else name)
        text = translate((src / name).read_text())
        if not target.exists() or target.read_text() != text:
            target.write_text(text)


if __name__ == "__main__":
    main()
