# The README's configuration.nix example, evaluated by nix/eval-check.sh and
# by the flake's module-eval check.
# SPDX-License-Identifier: GPL-3.0-or-later
{ pkgs, ... }:

{
  # Agents resolve names through systemd-resolved's stub on 127.0.0.53,
  # which they reach over lo; agent-egress queries it too.
  services.resolved.enable = true;

  networking.firewall.enable = true;
  networking.nftables.enable = true;

  services.agentEgress = {
    enable = true;

    # Every agent may fetch packages and talk to GitHub.
    allow.lists = [
      "npm"
      "github"
    ];
    # No agent may reach these, whatever its own lists say.
    block.domains = [ "pastebin.com" ];

    # Lists that several agents share.
    lists.internal = {
      description = "Our forge and CI";
      domains = [
        "git.example.com"
        "ci.example.com"
      ];
    };

    agents.codex = {
      units = [ "codex-nightly" ];
      allow.lists = [
        "openai"
        "internal"
      ];
    };

    agents.claude-code = {
      # Every instance of claude-code@.service, e.g. claude-code@repo1.
      units = [ "claude-code@" ];
      allow.lists = [
        "anthropic"
        "internal"
        "crates"
      ];
      block.domains = [ "=api.github.com" ];
    };

    # What no list covers is asked of a supervisor (the `ask` verdict; the
    # agent's connection waits, at most 30 s, then is refused): here a
    # script on the control socket that answers by host.
    control.enable = true;
    control.supervisors.by-host = {
      path = [
        pkgs.curl
        pkgs.jq
      ];
      script = ''
        api=http://agent-egress/v1/questions
        after=0
        while :; do
          q=$(curl -sf --unix-socket "$AGENT_EGRESS_CONTROL" "$api/next?timeout_ms=60000&after=$after" |
            jq -c .question) || { sleep 1; continue; }
          [ "$q" = null ] && continue
          id=$(jq -r .id <<<"$q")
          after=$id
          case $(jq -r .host <<<"$q") in
            pypi.org | files.pythonhosted.org) answer=allow-always ;; # a runtime rule from now on
            *) answer=deny-once ;;
          esac
          curl -sf --unix-socket "$AGENT_EGRESS_CONTROL" -d "{\"answer\": \"$answer\"}" "$api/$id/answer" || true
        done
      '';
    };

    # Anything the daemon's JSON accepts.
    settings = {
      default = "ask";
      ask.timeout_ms = 30000;
      dns.domain_dial = "verify";
      limits.idle_timeout_s = 600;
    };
  };

  users.users.agent = {
    isSystemUser = true;
    group = "agent";
  };
  users.groups.agent = { };

  systemd.services.codex-nightly = {
    description = "Nightly Codex run on our repository";
    path = [
      pkgs.git
      pkgs.nodejs
    ];
    environment.HOME = "/var/lib/codex-nightly";
    script = "exec npx --yes @openai/codex exec 'fix the failing tests'";
    serviceConfig = {
      User = "agent";
      StateDirectory = "codex-nightly";
      WorkingDirectory = "/srv/agent/repo";
      EnvironmentFile = "/etc/agent-secrets/openai.env";
    };
  };

  systemd.services."claude-code@" = {
    description = "Claude Code on %i";
    path = [ pkgs.nodejs ];
    environment.HOME = "/var/lib/claude-code/%i";
    script = ''exec npx --yes @anthropic-ai/claude-code -p "review the open pull requests"'';
    serviceConfig = {
      User = "agent";
      StateDirectory = "claude-code/%i";
      WorkingDirectory = "/srv/agent/%i";
      EnvironmentFile = "/etc/agent-secrets/anthropic.env";
    };
  };
}
