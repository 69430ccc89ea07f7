"""`python -m data_tools`: print the list of tools (the package docstring); --version."""
import sys

import data_tools

if __name__ == "__main__":
    if sys.argv[1:] == ["--version"]:
        from refimpl.deps import version_line
        print(f"python -m data_tools: {version_line()}")
    elif sys.argv[1:]:
        sys.exit(f"python -m data_tools: unexpected arguments {sys.argv[1:]}; run a tool: "
                 f"python -m data_tools.<tool> --help")
    else:
        print(data_tools.__doc__.strip())
