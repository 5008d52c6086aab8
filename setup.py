"""Install rt2_ros so that both pip users and `ros2 launch` find it.

ROS 2's launch finds a package through ``<prefix>/share/ament_index/resource_index/packages/<pkg>``
on AMENT_PREFIX_PATH and runs ``<prefix>/lib/<pkg>/<executable>``. setuptools' console scripts
land in ``<prefix>/bin``, so the node executables are small wrapper scripts shipped as data files
under ``lib/rt2_ros`` (they work the same in a pip venv and in a colcon install space).
"""

import subprocess
import sys
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PACKAGE = "rt2_ros"
HERE = Path(__file__).resolve().parent
NODE_EXECUTABLES = sorted(str(p.relative_to(HERE)) for p in (HERE / "scripts").iterdir() if p.is_file())


class BuildPyWithProto(build_py):
    """Generate the gRPC stubs from proto/ before copying the package (needs grpcio-tools)."""

    def run(self):
        result = subprocess.run([sys.executable, "-m", "rt2_ros.grpc_codegen"], cwd=HERE, check=False)
        if result.returncode != 0:
            print("warning: gRPC code generation failed; the grpc backend will be unavailable "
                  "(install grpcio-tools)", file=sys.stderr)
        super().run()


setup(
    name=PACKAGE,
    version="0.1.0",
    description="Robot side of RT-2 style vision-language-action policies for ROS 2",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rt2_ros", "rt2_ros.*"]),
    package_data={"rt2_ros.backends.proto": ["*.proto"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/rt2_ros"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.json")),
        (f"share/{PACKAGE}/config/backends", glob("config/backends/*.yaml")),
        (f"share/{PACKAGE}/proto", glob("rt2_ros/backends/proto/*.proto")),
        (f"share/{PACKAGE}/models/rt2-tiny", glob("models/rt2-tiny/*")),
        (f"lib/{PACKAGE}", NODE_EXECUTABLES),
    ],
    install_requires=[],  # pinned in requirements.txt; ROS packages come from the ROS install
    zip_safe=False,
    cmdclass={"build_py": BuildPyWithProto},
    entry_points={
        "console_scripts": [
            "rt2-tokens = rt2_ros.tokens_cli:main",
            "rt2-serve = rt2_ros.serve:main",
            "rt2-fleet-serve = rt2_ros.fleet.front:main",
            "rt2-bringup = rt2_ros.nodes.bringup:main",
            "rt2-say = rt2_ros.nodes.say:main",
            "rt2-status = rt2_ros.nodes.status:main",
            "rt2-demo = rt2_ros.demo:main",
            "rt2-record = rt2_ros.nodes.record:main",
            "rt2-replay = rt2_ros.recording:replay_main",
            "rt2-collect = rt2_ros.learn.collect:main",
            "rt2-train = rt2_ros.learn.train:main",
            "rt2-eval = rt2_ros.learn.evaluate:main",
        ],
    },
)
