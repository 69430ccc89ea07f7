"""Check that a venv holds exactly the versions a constraints file pins (``make test-min``).

    python tests/check_pins.py tests/min_versions.txt

Prints the Python version and every pinned package's installed version;
exits 1 naming each package whose installed version is not its pin (pip
may quietly take a newer one when another package asks for it). A pin
with an environment marker (``tomli==2.0.0; python_version < "3.11"``)
is skipped where the marker leaves the package uninstalled.
"""
import importlib.metadata as md
import sys


def pins(path):
    """[(name, version, has_marker)] of the ``name==version`` lines of a constraints file."""
    out = []
    for line in open(path):
        spec, *marker = line.split("#")[0].split(";")
        if spec.strip():
            name, version = spec.strip().split("==")
            out.append((name.strip(), version.strip(), bool(marker)))
    return out


def main(path):
    have = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions()}
    wanted = pins(path)
    bad = [f"  {n}: pinned {v}, installed {have.get(n.lower())}" for n, v, marked in wanted
           if have.get(n.lower()) != v and not (marked and n.lower() not in have)]
    print("Python", sys.version.split()[0], *[f"{n}=={have[n.lower()]}" for n, _, _ in wanted
                                              if n.lower() in have])
    if bad:
        sys.exit("\n".join(["not the pinned versions:"] + bad))


if __name__ == "__main__":
    main(sys.argv[1])
