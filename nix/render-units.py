#!/usr/bin/env python3
# Renders what nix/eval-check.nix evaluated into files, for nix/eval-check.sh:
#   verify EVAL_JSON DIR: each accepted case's units under DIR/CASE/, Exec*
#     commands replaced by /bin/true (store paths are absent here), for
#     systemd-analyze verify;
#   install EVAL_JSON OUT: the systemd VM's install set (units, drop-ins,
#     config, logrotate config, scripts) as JSON, evaluation paths mapped to
#     the store paths a NixOS system would have, for tests/systemd_vm.rs.
# Units are written as NixOS writes them: one line per list item, booleans as
# true/false. The logrotate config follows logrotate's syntax: the files, then
# one directive a line (true: the bare directive, false: its "no" form).
# SPDX-License-Identifier: GPL-3.0-or-later
import json
import os
import sys

# Where the evaluation's stand-ins live, and the paths they take in the install set.
GENERATED = "/nix/store/eval-generated"
PACKAGE = "/nix/store/eval-stub-agent-egress"
# Units the module defines whole; to the others (the agents' own) it adds
# only its part, as a drop-in.
MODULE_DEFINED = (
    "agent-egress.service",
    "agent-egress-doctor.service",
    "agent-egress-doctor.timer",
    "agent-egress-learn.service",
    "agent-egress-learn.timer",
)
# The units of services.agentEgress.control.supervisors, defined whole too.
SUPERVISORS = "agent-egress-supervisor-"
# Where a unit's `script` goes in the guest (NixOS puts it in the store).
SCRIPTS = "/etc/agent-egress/scripts"


def unit_text(sections, exec_as=None, description=None):
    lines = []
    if description and "Description" not in sections.get("Unit", {}):
        sections = {**sections, "Unit": {"Description": description, **sections.get("Unit", {})}}
    order = ["Unit"] + sorted(set(sections) - {"Unit", "Install"}) + ["Install"]
    for section in (name for name in order if name in sections):
        settings = sections[section]
        lines.append(f"[{section}]")
        if exec_as and section == "Service" and "ExecStart" not in settings:
            lines.append(f"ExecStart={exec_as}")
        for key, value in settings.items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bool):
                    item = "true" if item else "false"
                if exec_as and key.startswith("Exec"):
                    item = exec_as
                lines.append(f"{key}={item}")
    return "\n".join(lines) + "\n"


def logrotate_text(settings):
    files = settings["files"]
    lines = [f"{' '.join(files) if isinstance(files, list) else files} {{"]
    for key, value in sorted(settings.items()):
        if key in ("files", "enable", "global", "priority") or value is None:
            continue
        if key == "frequency":
            lines.append(f"  {value}")
        elif key in ("firstaction", "lastaction", "prerotate", "postrotate", "preremove"):
            lines += [f"  {key}", f"    {value}", "  endscript"]
        elif value is True:
            lines.append(f"  {key}")
        elif value is False:
            lines.append(f"  no{key}")
        else:
            lines.append(f"  {key} {value}")
    return "\n".join(lines + ["}"]) + "\n"


def verify(generated, directory):
    for case, out in generated["accepted"].items():
        case_dir = os.path.join(directory, case)
        os.makedirs(case_dir, exist_ok=True)
        for unit, sections in out["units"].items():
            name = unit.replace("@.service", "@x.service")
            with open(os.path.join(case_dir, name), "w") as f:
                f.write(unit_text(sections, exec_as="/bin/true", description="eval-check"))


def install(generated, package_dir):
    def mapped(text):
        return text.replace(case["dir"], GENERATED).replace(package_dir, PACKAGE)

    cases = {}
    for name, case in generated["systemd"].items():
        units = {}
        files = {}
        executables = []
        for unit, sections in case["units"].items():
            script = case["scripts"].get(unit)
            if script:
                # As NixOS runs `script`: bash -e, with `path` on PATH.
                start = f"{SCRIPTS}/{unit.removesuffix('.service')}-start"
                files[start] = mapped("#!/bin/bash -e\n" + script["text"])
                executables.append(start)
                service = sections.get("Service", {})
                # NixOS writes `path` as an Environment= line of its own,
                # beside the unit's.
                own = service.get("Environment", [])
                service = {
                    **service,
                    "Environment": ["PATH=" + ":".join(p + "/" for p in script["path"]) + ":/usr/bin:/bin"]
                    + (own if isinstance(own, list) else [own]),
                    "ExecStart": start,
                }
                sections = {**sections, "Service": service}
            text = mapped(unit_text(sections))
            if unit.endswith(".slice") or unit in MODULE_DEFINED or unit.startswith(SUPERVISORS):
                units[unit] = text
            else:
                units[f"{unit}.d/agent-egress.conf"] = text
        files["/etc/agent-egress/config.json"] = case["json"] + "\n"
        if case["logrotate"]:
            files["/etc/logrotate.d/agent-egress"] = logrotate_text(case["logrotate"])
        cases[name] = {
            "units": units,
            "files": files,
            "executables": executables,
            "groups": sorted(case["groups"]),
        }
    return {
        "about": "Generated by nix/eval-check.sh from the module's evaluation at the pinned "
        "release; tests/systemd_vm.rs installs it. Do not edit: run "
        "EVAL_CHECK_UPDATE=1 nix/eval-check.sh LIB_PATH.",
        "cases": cases,
    }


def main():
    mode, eval_json, target = sys.argv[1:4]
    generated = json.load(open(eval_json))
    if mode == "verify":
        verify(generated, target)
    elif mode == "install":
        with open(target, "w") as f:
            json.dump(install(generated, sys.argv[4]), f, indent=2, sort_keys=True)
            f.write("\n")
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
