"""deepseek-tfx: a TFX pipeline that builds, validates, trains, gates and
pushes DeepSeek-V3-style models (MLA + DeepSeekMoE) written in Keras 3."""

from setuptools import setup

PACKAGES = ["pipeline", "components", "model", "data", "kubeflow", "benchmarks", "training"]

setup(
    name="deepseek-tfx",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10,<3.11",
    packages=PACKAGES,
    package_data={"pipeline": ["*.json"], "kubeflow": ["*.txt"]},
    # The exact environment is requirements/lock.txt (installed by
    # scripts/bootstrap.sh); these are the direct needs, kept loose so the
    # lock stays the single source of versions.
    install_requires=["tfx[kfp]==1.16.0", "keras>=3.12,<3.13", "numpy<2"],
    entry_points={"console_scripts": ["deepseek-tfx=pipeline.cli:main"]},
)
