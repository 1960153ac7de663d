#!/usr/bin/env python3
"""Import audit of the driver image, run by `scripts/check-windows.sh --imports`.

    check-imports.py TARGET NM_OUTPUT

NM_OUTPUT is `llvm-nm -A` of the driver's release staticlib for TARGET. The linker would take
into the image the members reachable from the crate's own (LTO) object, so this follows the
same closure: start from the `vmbsrv` members, add every member that defines a symbol still
undefined, repeat. What stays undefined is what the image imports (kernel exports, and the KMDF
stub library's symbols).

Each import must have a row in docs/windows-imports.md with its minimum Windows build, and no row
may need a newer build than the one the INF's models decoration claims (`NT$ARCH$.10.0...<build>`),
which README.md must state as well. Prints one line per import and a summary; exits 1 on any
missing row or newer requirement.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "windows-imports.md"
INF = ROOT / "inf" / "vmbsrv.inx"
README = ROOT / "README.md"


def parse_nm(path):
    """{member: (defined, undefined)} from `llvm-nm -A` lines `lib:member: [addr] TYPE name`."""
    members = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        match = re.match(r"^(.*?):(\S.*?):\s+(?:[0-9a-fA-F]+\s+)?([A-Za-z?-])\s+(\S+)$", line)
        if not match:
            continue
        _, member, kind, name = match.groups()
        defined, undefined = members.setdefault(member, (set(), set()))
        if kind in "Uuvw":
            # `w`/`v` are weak; treat like undefined only if nothing defines them (below).
            undefined.add(name)
        else:
            defined.add(name)
    return members


def imports_of(members):
    roots = [m for m in members if re.search(r"(^|[/\\])vmbsrv-[0-9a-f]+", m)]
    if not roots:
        sys.exit("check-imports: no vmbsrv object in the staticlib")
    definers = {}
    for member, (defined, _) in members.items():
        for name in defined:
            definers.setdefault(name, member)
    included = set(roots)
    pending = list(roots)
    while pending:
        member = pending.pop()
        for name in members[member][1]:
            other = definers.get(name)
            if other and other not in included:
                included.add(other)
                pending.append(other)
    defined = set().union(*(members[m][0] for m in included))
    undefined = set().union(*(members[m][1] for m in included))
    return sorted({n.removeprefix("__imp_") for n in undefined - defined})


def parse_table():
    """{symbol: (build, text)} from the rows `| `Symbol` | provider | text (build N) | source |`."""
    rows = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        symbol = cells[0].strip("`")
        build = re.search(r"build (\d+)", cells[2])
        if not build or "learn.microsoft.com" not in line and "WDK" not in cells[1]:
            sys.exit(f"check-imports: row for {symbol} lacks a build number or a source")
        rows[symbol] = (int(build.group(1)), cells[2])
    return rows


def claimed_build():
    match = re.search(r"NT\$ARCH\$\.10\.0\.\.\.(\d+)", INF.read_text())
    if not match:
        sys.exit("check-imports: no NT$ARCH$.10.0...<build> decoration in inf/vmbsrv.inx")
    build = int(match.group(1))
    if f"build {build}" not in README.read_text():
        sys.exit(f"check-imports: README.md does not state the INF's minimum (build {build})")
    return build


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    target, nm_output = sys.argv[1], sys.argv[2]
    imports = imports_of(parse_nm(nm_output))
    rows = parse_table()
    claim = claimed_build()
    failures = 0
    newest = 0
    for name in imports:
        row = rows.get(name)
        if row is None:
            print(f"  {name}: MISSING from docs/windows-imports.md")
            failures += 1
            continue
        build, text = row
        newest = max(newest, build)
        mark = "" if build <= claim else f"  NEWER than the claimed build {claim}"
        failures += bool(mark)
        print(f"  {name}: {text}{mark}")
    verdict = "ok" if failures == 0 else f"FAILED ({failures} problem(s))"
    print(
        f"{target} imports: {verdict}: {len(imports)} imports, newest needs build {newest}, "
        f"INF/README claim build {claim}"
    )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
