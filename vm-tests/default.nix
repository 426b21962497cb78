# The VM tests, one per NixOS firewall backend.
# SPDX-License-Identifier: GPL-3.0-or-later
{
  pkgs,
  # The agent-egress NixOS module, with its package set.
  module,
}:

let
  test =
    firewallBackend:
    pkgs.testers.runNixOSTest (import ./agent-egress.nix { inherit pkgs module firewallBackend; });
in
{
  nftables = test "nftables";
  iptables = test "iptables";
}
