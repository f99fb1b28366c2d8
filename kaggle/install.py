"""Install vaehelpers on Kaggle from the wheel beside this file, keeping the preinstalled torch and torchvision.

Uploaded as vaehelpers_install.py in the dataset <user>/vaehelpers-src by `vaehelpers kaggle push`; the first
cell of every notebook runs it when vaehelpers is not importable. A constraints file pins torch and torchvision
to the versions already installed, so pip installs only what is missing and never replaces Kaggle's CUDA build.
"""
import glob
import importlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile


def installed_pins(packages=("torch", "torchvision")):
    """'name==version' for each of packages that is installed (e.g. torch==2.6.0+cu124)."""
    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return pins


def install_command(wheel, constraints_file):
    return [sys.executable, "-m", "pip", "install", "--quiet", "--constraint", constraints_file, wheel]


def main(folder=None, run=subprocess.run):
    folder = folder or os.path.dirname(os.path.abspath(__file__))
    wheels = sorted(glob.glob(os.path.join(folder, "vaehelpers-*.whl")))
    if not wheels:
        raise FileNotFoundError(f"no vaehelpers wheel in {folder}: run `vaehelpers kaggle push` again")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(installed_pins()) + "\n")
    run(install_command(wheels[-1], handle.name), check=True)
    importlib.invalidate_caches()  # this kernel imports the new package without a restart
    print(f"installed {os.path.basename(wheels[-1])}; kept {', '.join(installed_pins()) or 'no torch'}")


if __name__ == "__main__":
    main()
