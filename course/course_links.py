"""Check (and fix) the links from the course and docs/pitfalls.md into the code.

    python course/course_links.py          # list every broken link; exit 1 if there is one
    python course/course_links.py --fix    # move line anchors to where the named code now is

A lesson links to code lines as [`masked_cross_entropy`](../../loss.py#L104) or a range
(#L104-L120). The link must name a file that exists, lines the file has, and, when the link text
is `code`, that code must appear in the linked lines. Code moves when others edit a file; --fix
then points the anchor at the definition of the name (def / class / NAME = / NAME:), or at the first
line that holds the text, keeping the length of a range. tests/test_course.py runs the check.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s#]+)(?:#L(\d+)(?:-L(\d+))?)?\)")


def markdown_files():
    course = os.path.join(ROOT, "course")
    files = [os.path.join(course, f) for f in sorted(os.listdir(course)) if f.endswith(".md")] \
        if os.path.isdir(course) else []
    pitfalls = os.path.join(ROOT, "docs", "pitfalls.md")
    return files + ([pitfalls] if os.path.exists(pitfalls) else [])


def code_of(text):
    """The code a link text names: `masked_cross_entropy` -> masked_cross_entropy; None for prose."""
    m = re.fullmatch(r"`([^`]+)`(?:\(\))?", text.strip())
    return m.group(1).removesuffix("()") if m else None


def find_line(lines, code):
    """1-based line of code's definition (def/class/assignment/field), else of its first mention."""
    name = re.escape(code.split(".")[-1])
    for pattern in (rf"^\s*(def|class)\s+{name}\b", rf"^\s*{name}\s*(:|=[^=])"):
        for k, line in enumerate(lines, start=1):
            if re.search(pattern, line):
                return k
    return next((k for k, line in enumerate(lines, start=1) if code in line), None)


def check_file(path, fix=False):
    """[(path:line, problem)] of the broken links of one markdown file; with fix, rewrite anchors."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    problems, out, last = [], [], 0
    for m in LINK.finditer(text):
        label, target, start, end = m.group(1), m.group(2), m.group(3), m.group(4)
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        where = f"{os.path.relpath(path, ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
        file = os.path.normpath(os.path.join(os.path.dirname(path), target))
        if not os.path.exists(file):
            problems.append((where, f"{target}: no such file"))
            continue
        if start is None or os.path.isdir(file):
            continue
        with open(file, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        a, b = int(start), int(end or start)
        code = code_of(label)
        ok = 1 <= a <= b <= len(lines) and (code is None or code in "\n".join(lines[a - 1:b]))
        if ok:
            continue
        found = find_line(lines, code) if code else None
        if fix and found:
            anchor = f"#L{found}" + (f"-L{found + b - a}" if end else "")
            out.append(text[last:m.start()] + f"[{label}]({target}{anchor})")
            last = m.end()
            continue
        problems.append((where, f"{target}#L{a}" + (f"-L{b}" if end else "") + ": " +
                         (f"`{code}` is not in those lines" + (f" (it is at line {found}; run "
                          f"python course/course_links.py --fix)" if found else " nor anywhere in the file")
                          if code else f"the file has {len(lines)} lines")))
    if fix and out:
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(out) + text[last:])
    return problems


def main(argv=None):
    fix = "--fix" in (sys.argv[1:] if argv is None else argv)
    problems = [p for path in markdown_files() for p in check_file(path, fix)]
    for where, problem in problems:
        print(f"{where}: {problem}")
    print(f"{len(problems)} broken link(s)" if problems else "all links good")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
