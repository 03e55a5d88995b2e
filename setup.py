"""Packaging for lidar_ptq. The core needs only torch and numpy; integrations are extras."""
from pathlib import Path

from setuptools import find_packages, setup


def read_requirements(name: str) -> list[str]:
    lines = (Path(__file__).parent / "requirements" / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


setup(
    name="lidar_ptq",
    version="0.1.0",
    description="Post-training quantization (LiDAR-PTQ) for LiDAR 3D detectors in mmdetection3d",
    long_description=(Path(__file__).parent / "README.md").read_text() if (Path(__file__).parent / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["lidar_ptq", "lidar_ptq.*"]),
    install_requires=["torch>=2.0", "numpy>=1.22", "tqdm>=4.60"],
    extras_require={
        "cpu": read_requirements("spconv-cpu.txt"),
        "cuda": read_requirements("spconv-cuda.txt"),
        "mmdet3d": read_requirements("mmdet3d.txt") + ["mmcv==2.1.0", "mmdet==3.3.0", "mmdet3d==1.4.0"],
        "export": read_requirements("export.txt"),
        "dev": read_requirements("dev.txt"),
    },
)
