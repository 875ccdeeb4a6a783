"""Import a file of examples/ as a module the way Ray Serve needs it: Serve pickles a deployment
class by value, because the replica processes cannot import a file that is not in a package."""
import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(filename: str):
    """``examples/<filename>`` as a module (loaded once per test process)."""
    import ray.cloudpickle

    name = "ray_eplb_example_" + Path(filename).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / filename)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        ray.cloudpickle.register_pickle_by_value(mod)
    return sys.modules[name]
