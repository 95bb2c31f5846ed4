"""Compare two results.json files leaf by leaf; print what differs. Run: python compare.py A/results.json B/results.json"""
import json
import sys


def leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, x


a, b = (dict(leaves(json.load(open(p)))) for p in sys.argv[1:3])
same = [p for p in a if p in b and a[p] == b[p]]
print(f"{len(same)} leaves identical")
for p in sorted(set(a) | set(b)):
    if p not in b or p not in a or a[p] != b[p]:
        print(f"{p}: {a.get(p, '(absent)')!r} -> {b.get(p, '(absent)')!r}")
