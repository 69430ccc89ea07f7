"""`python -m data_tools`: print the list of tools (the package docstring)."""
import data_tools

if __name__ == "__main__":
    print(data_tools.__doc__.strip())
