"""megatron-asyncmesh: asynchronous pipeline and data parallelism for Megatron-core.

Install with ``bash tools/setup_env.sh`` (it pins torch first and builds
DeepSpeed without build isolation); ``pip install -e .`` works in an
environment that already has requirements.txt installed.
"""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def requirements():
    with open(os.path.join(here, "requirements.txt")) as f:
        return [line.split("#")[0].strip() for line in f
                if line.split("#")[0].strip()]


setup(
    name="megatron-asyncmesh",
    version="0.1.0",
    description="Fully asynchronous pipeline and data parallelism for Megatron-core and DeepSpeed",
    long_description=open(os.path.join(here, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_asyncmesh", "megatron_asyncmesh.*"]),
    python_requires=">=3.12,<3.13",
    install_requires=requirements(),
    entry_points={
        "console_scripts": [
            "asyncmesh-train=megatron_asyncmesh.train:main",
            "asyncmesh-demo=megatron_asyncmesh.demo:main",
            "asyncmesh-preprocess=megatron_asyncmesh.data.preprocess:main",
        ]
    },
    license="Apache-2.0",
)
