"""Point the ROS wheels' rosidl_generator_py CMake exports at this venv's Python and numpy headers.

The PyPI ROS 2 wheels were built in a manylinux container and their
``share/*/cmake/export_*__rosidl_generator_pyExport.cmake`` files hard-code that container's
``/opt/python/...`` include directories; generating our messages against them fails. Rewriting is
idempotent, so it is safe to run after every (re)install.
"""

import re
import sys
import sysconfig
from pathlib import Path

import numpy


def main(venv: str) -> int:
    includes = f"{sysconfig.get_paths()['include']};{numpy.get_include()}"
    pattern = re.compile(r'(INTERFACE_INCLUDE_DIRECTORIES ")[^"]*(/opt/python/)[^"]*(")')
    changed = 0
    for path in Path(venv, "share").glob("*/cmake/export_*__rosidl_generator_pyExport.cmake"):
        text = path.read_text()
        new = pattern.sub(lambda m: f"{m.group(1)}{includes}{m.group(3)}", text)
        if new != text:
            path.write_text(new)
            changed += 1
    print(f"fix_rosidl_exports: rewrote {changed} export file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
