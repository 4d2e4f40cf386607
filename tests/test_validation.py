"""Bad input raises ValueError / TypeError naming the argument, before any kernel launch."""
import math
import os
import subprocess
import sys

import pytest
import torch

import hrmloss


def tensors(N=4, V=10):
    return torch.randn(N, V), torch.randn(N, V), torch.randint(0, V, (N,))



CASES = [
    # (kwargs or tensor edits, exception, text the message must name)
    (dict(hrm=-1.0), ValueError, "hrm"),
    (dict(hrm=math.inf), ValueError, "hrm"),
    (dict(hrm=math.nan), ValueError, "hrm"),
    (dict(hrm="0.5"), TypeError, "hrm"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-2.0), ValueError, "temperature"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta=1.0), ValueError, "beta"),
    (dict(kl="kld"), ValueError, "kl"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(return_components="yes"), TypeError, "return_components"),
]


@pytest.mark.parametrize("kwargs,exc,text", CASES, ids=[str(c[0]) for c in CASES])
def test_bad_options(no_launch, kwargs, exc, text):
    s, t, y = tensors()
    with pytest.raises(exc, match=text):
        hrmloss.hrm_loss(s, t, y, **kwargs)
    if "return_components" not in kwargs:
        with pytest.raises(exc, match=text):
            hrmloss.HRMLoss(**kwargs)


def test_bad_tensors(no_launch):
    s, t, y = tensors()
    bad = [
        ((s, t[:, :9], y), ValueError, "ref_logits.shape"),
        ((s, t[:3], y), ValueError, "ref_logits.shape"),
        ((s, t, y[:3]), ValueError, "labels.shape"),
        ((s.long(), t, y), TypeError, "logits.dtype"),
        ((s, t.int(), y), TypeError, "ref_logits.dtype"),
        ((s, t, y.float()), TypeError, "labels.dtype"),
        ((s, t, y.to(torch.int16)), TypeError, "labels.dtype"),
        ((s.numpy(), t, y), TypeError, "logits"),
        ((torch.randn(4, 0), torch.randn(4, 0), y), ValueError, "V >= 1"),
        ((s, t, torch.tensor([0, 1, 10, 2])), ValueError, "labels contains 10"),
        ((s, t, torch.tensor([0, -1, 3, 2])), ValueError, "labels contains -1"),
    ]
    for args, exc, text in bad:
        with pytest.raises(exc, match=text):
            hrmloss.hrm_loss(*args)


def test_ignore_index_is_not_out_of_range(no_launch):
    s, t, _ = tensors()
    with pytest.raises(ValueError, match="labels contains -100"):
        hrmloss.hrm_loss(s, t, torch.tensor([0, -100, 1, 2]), ignore_index=-1)


def test_float64_only_on_the_torch_backend(no_launch):
    s, t, y = tensors()
    with pytest.raises(TypeError, match="float64"):
        hrmloss.hrm_loss(s.double(), t, y, backend="triton")


def test_triton_on_cpu_needs_the_interpreter():
    code = ("import torch, hrmloss\n"
            "try:\n"
            "    hrmloss.hrm_loss(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([1, 2]), backend='triton')\n"
            "except ValueError as e:\n"
            "    assert 'backend' in str(e) and 'TRITON_INTERPRET' in str(e), e\n"
            "    print('raised')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "raised", out.stderr[-2000:]


def test_import_and_run_without_triton():
    # hide triton: `import hrmloss` works and "auto" takes the torch path; forcing triton says why not
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'triton' or name.startswith('triton.'):\n"
            "            raise ImportError('no triton here')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import torch, hrmloss\n"
            "s, t, y = torch.randn(3, 7), torch.randn(3, 7), torch.tensor([0, 1, 2])\n"
            "print(float(hrmloss.hrm_loss(s, t, y)) > 0)\n"
            "try:\n"
            "    hrmloss.hrm_loss(s, t, y, backend='triton')\n"
            "except ValueError as e:\n"
            "    print('triton' in str(e))\n"
            "print('triton' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "True", "False"], out.stderr[-2000:]


def test_import_does_no_heavy_work():
    # what `import hrmloss` adds beyond `import torch` (torch itself may pull some of these)
    code = ("import sys, torch; before = set(sys.modules); import hrmloss\n"
            "print(sorted(m for m in ('triton', 'matplotlib', 'scipy', 'tqdm') if m in set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_both_entry_points_take_every_option_of_the_list_with_its_default():
    # the front end builds the option dictionary from options.OPTION_NAMES: a keyword missing from a public
    # signature (or with another default) would silently never reach the loss
    import dataclasses
    import inspect

    from hrmloss.engine.options import LossOptions

    defaults = {f.name: f.default for f in dataclasses.fields(LossOptions)}
    for fn, not_taken in ((hrmloss.hrm_loss, ()), (hrmloss.linear_hrm_loss, ("inplace_backward",))):
        params = inspect.signature(fn).parameters
        for name, default in defaults.items():
            if name in not_taken:
                assert name not in params
                continue
            assert name in params, f"{fn.__name__} has no keyword {name}"
            assert params[name].default == default, (fn.__name__, name, params[name].default, default)
