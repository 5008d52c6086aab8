"""Start rt2_ros the ROS way: ``ros2 launch rt2_ros rt2.launch.py [name:=value ...]``.

The same nodes and YAML as ``rt2-bringup`` (which pip-only machines use instead), one process
per node. Arguments (``--show-args`` lists them): ``params_file``; ``extra_params_file``, layered
on top of it (its values win) like a second ``rt2-bringup --params``, e.g. the installed
``share/rt2_ros/config/backends/grpc.yaml``; ``backend``, which overrides ``backend.type`` of the
policy node; ``sim:=true`` to add the simulated arm; ``autostart:=false`` to leave the managed
(lifecycle) nodes rt2_safety and rt2_policy unconfigured for a lifecycle manager or
``ros2 lifecycle set`` (by default each node configures and activates itself). Topic names are
relative (``camera/image``, ``instruction``, ``episode``, ``ee_pose``, ``arm_action``,
``servo_node/delta_twist_cmds``, ``gripper_command`` ...): remap them by including this file
from your own launch file inside a ``GroupAction`` with launch_ros ``SetRemap`` / ``PushRosNamespace``, see the README.

Checked before any node starts, because a node that quietly runs on defaults is the worst
failure on a robot: a missing params file (launch_ros only warns, and the nodes would start with
the default workspace and speed limits), one that is not valid YAML or names an unknown node,
and a ``sim`` or ``autostart`` value other than true/false are errors that name the argument. The nodes are
required: when one exits (a configuration error names the key, exit code 2) the launch shuts
the others down instead of leaving a half-started system that looks alive.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

try:  # rt2-bringup's check; missing only when ros2 launch runs in another Python than rt2_ros
    from rt2_ros.nodes.bringup import load_params_file
except ImportError:
    load_params_file = None

# launch's own spelling of booleans (IfCondition accepts the same values)
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


class LaunchArgumentError(ValueError):
    """A launch argument of rt2.launch.py has a value that cannot be used."""


def _params_files(context) -> list[str]:
    files = [LaunchConfiguration("params_file").perform(context)]
    extra = LaunchConfiguration("extra_params_file").perform(context)
    if extra:
        files.append(extra)
    for path in files:
        if not os.path.isfile(path):
            raise LaunchArgumentError(f"params file not found: {path}")
        if load_params_file is not None:
            load_params_file(path)  # ParamsFileError names the file and what is wrong with it
    return files


def _flag(context, name: str) -> bool:
    value = LaunchConfiguration(name).perform(context)
    try:
        return _BOOLEANS[value.strip().lower()]
    except KeyError:
        raise LaunchArgumentError(f"{name}:={value!r}: expected true or false") from None


def _required_node(name: str, executable: str, parameters: list) -> Node:
    # on_exit Shutdown: launch logs "process[...] was required: shutting down launched system"
    return Node(package="rt2_ros", executable=executable, name=name, output="screen", parameters=parameters,
                on_exit=[Shutdown()])


def _nodes(context, *args, **kwargs):
    params = _params_files(context)
    backend = LaunchConfiguration("backend").perform(context)
    managed = [*params, {"autostart": _flag(context, "autostart")}]
    nodes = [
        _required_node("rt2_safety", "safety_node", managed),
        _required_node("rt2_policy", "policy_node", managed + ([{"backend.type": backend}] if backend else [])),
    ]
    if _flag(context, "sim"):
        nodes.append(_required_node("rt2_sim", "sim_node", params))
    return nodes


def generate_launch_description():
    config = os.path.join(get_package_share_directory("rt2_ros"), "config")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(config, "rt2.yaml"),
                              description="ROS 2 params YAML for all rt2_ros nodes"),
        DeclareLaunchArgument("extra_params_file", default_value="",
                              description="optional params YAML layered on params_file (its values win), "
                                          f"e.g. {os.path.join(config, 'backends', 'grpc.yaml')}"),
        DeclareLaunchArgument("backend", default_value="",
                              description="override backend.type (embedded, local, grpc, openvla_http, openpi, "
                                          "openai, scripted); empty keeps the params files' choice"),
        DeclareLaunchArgument("sim", default_value="false",
                              description="also start the simulated tabletop arm (pybullet): true or false"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="configure and activate the managed nodes at start-up: true or false"),
        OpaqueFunction(function=_nodes),
    ])
