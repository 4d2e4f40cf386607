"""Optional dependencies, imported where a function needs them, with the extra that installs them."""
import importlib

# module -> the extra of pyproject.toml that brings it
EXTRAS = {"scipy": "plot", "matplotlib": "plot", "tqdm": "demo", "tensorboard": "tensorboard"}


def require(module, what):
    """Import `module` (e.g. "scipy.optimize") for `what`, or say which extra to install.

    Raises ModuleNotFoundError naming the missing package and the pip command, e.g.
    `fit_power_law needs scipy, which is not installed: pip install "hrmloss[plot]"`.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        raise ModuleNotFoundError(f"{what} needs {top}, which is not installed: "
                                  f'pip install "hrmloss[{EXTRAS[top]}]"', name=e.name) from e
