"""The DPU model's building blocks: CPU layouts, cgroups, placed launches, read-back, profiles.

DESIGN §5: every role runs on a declared CPU set, the DPU daemons on their own
cores throttled to the DPU's speed, and what is really in force is read back
from the kernel. `layout` and `profiles` are pure; `cgroups`, `launch` and
`readback` do the system work.
"""

from harness.placement.cgroups import CgroupSet, Hierarchy, detect, remove_stale
from harness.placement.launch import wrap_argv
from harness.placement.layout import (
    CPU_SETS,
    ROLE_CPU_SET,
    Layout,
    PlacementError,
    auto_layout,
    format_cpus,
    parse_cpus,
    parse_layout,
    role_cpuset,
    shared_layout,
)
from harness.placement.profiles import (
    DpuModel,
    Fit,
    Profile,
    Sourced,
    get_profile,
    load_profiles,
    resolve,
)
from harness.placement.readback import (
    cgroup_limit,
    check_limit,
    check_processes,
    observe,
    online_cpus,
)

__all__ = [
    "CPU_SETS",
    "ROLE_CPU_SET",
    "CgroupSet",
    "DpuModel",
    "Fit",
    "Hierarchy",
    "Layout",
    "PlacementError",
    "Profile",
    "Sourced",
    "auto_layout",
    "cgroup_limit",
    "check_limit",
    "check_processes",
    "detect",
    "format_cpus",
    "get_profile",
    "load_profiles",
    "observe",
    "online_cpus",
    "parse_cpus",
    "parse_layout",
    "remove_stale",
    "resolve",
    "role_cpuset",
    "shared_layout",
    "wrap_argv",
]
