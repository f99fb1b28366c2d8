"""Install vaehelpers on Kaggle from the wheel beside this file, keeping the preinstalled torch and torchvision.

Uploaded as vaehelpers_install.py in the dataset <user>/vaehelpers-src by `vaehelpers kaggle push`; the first
cell of every notebook runs it when vaehelpers is not importable. A constraints file pins torch and torchvision
to the versions already installed, so pip installs only what is missing and never replaces Kaggle's CUDA build.
With the internet off, pip can install only what Kaggle's image already has: a missing dependency is named,
with the fix, instead of pip's bare error.
"""

import glob
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile


class InstallError(RuntimeError):
    """pip could not install the wheel; the message names the missing package and what to do."""


def installed_pins(packages=("torch", "torchvision")):
    """'name==version' for each of packages that is installed (e.g. torch==2.6.0+cu124)."""
    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return pins


def install_command(wheel, constraints_file, pip_args=()):
    return [sys.executable, "-m", "pip", "install", "--quiet", "--constraint", constraints_file, *pip_args, wheel]


def missing_package(pip_output):
    """The requirement pip could not find ("No matching distribution found for X"), or None."""
    found = re.search(r"No matching distribution found for ([^\s;]+)", pip_output)
    return found.group(1) if found else None


def explain_failure(returncode, pip_output):
    """One message for a failed pip run: the missing package and the fix, else pip's last error line."""
    package = missing_package(pip_output)
    if package:
        return (
            f"cannot install vaehelpers: it needs {package}, which this Kaggle image does not have, and pip "
            "could not download it (the internet is off for this notebook). Turn the internet on (Settings > "
            "Internet on, in the editor's right-hand panel) and run this cell again."
        )
    errors = [line for line in pip_output.splitlines() if line.startswith("ERROR")] or pip_output.splitlines()[-1:]
    return f"cannot install vaehelpers: pip exited with status {returncode}: {errors[-1] if errors else 'no output'}"


def main(folder=None, run=subprocess.run, pip_args=()):
    folder = folder or os.path.dirname(os.path.abspath(__file__))
    wheels = sorted(glob.glob(os.path.join(folder, "vaehelpers-*.whl")))
    if not wheels:
        raise FileNotFoundError(f"no vaehelpers wheel in {folder}: run `vaehelpers kaggle push` again")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(installed_pins()) + "\n")
    finished = run(install_command(wheels[-1], handle.name, pip_args), capture_output=True, text=True)
    if finished.returncode:
        raise InstallError(explain_failure(finished.returncode, f"{finished.stdout}\n{finished.stderr}"))
    importlib.invalidate_caches()  # this kernel imports the new package without a restart
    print(f"installed {os.path.basename(wheels[-1])}; kept {', '.join(installed_pins()) or 'no torch'}")


if __name__ == "__main__":
    main()
