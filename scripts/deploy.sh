#!/usr/bin/env bash
# Deploys production (fly.toml, app `relay`) to every production region, one machine per
# region, rolling, then smoke-tests every region. `scripts/deploy.sh --dry-run` prints the
# commands without running any; `--help` lists the options. The procedure and the region
# lists live in scripts/lib-deploy.sh, shared with scripts/deploy-staging.sh.
set -euo pipefail
# shellcheck source=scripts/lib-deploy.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-deploy.sh"
relay_deploy production "$@"
