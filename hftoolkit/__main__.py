"""Usage: python -m hftoolkit train RECIPE.yaml  (also: accelerate launch -m hftoolkit train RECIPE.yaml)"""

from hftoolkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
