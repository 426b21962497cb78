# Who answers for the package and the module, in nixpkgs' maintainer format
# (lib.maintainers entries): meta.maintainers of both.
# SPDX-License-Identifier: GPL-3.0-or-later
{
  agent-egress = {
    name = "agent-egress developers";
    github = "agent-egress";
  };
}
