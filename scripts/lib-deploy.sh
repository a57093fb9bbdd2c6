#!/usr/bin/env bash
# The deploy procedure shared by scripts/deploy.sh (production) and
# scripts/deploy-staging.sh (staging), and the one place where each environment's regions
# are listed. Sourced by those two scripts, never run by itself:
#
#   relay_deploy <production|staging> [options] [-- <smoke-test options>]
#
# Steps, each printed as `+ <command>` before it runs:
#   1. fly scale count <n> --max-per-region 1 --region <regions> --app <app> --yes
#      (exactly one machine in each region; scaling clones the existing machines, so the
#      very first deploy of an app is a plain `fly deploy`, see the README)
#   2. fly deploy --strategy rolling --config <toml> --app <app>
#      (one machine at a time: each drains its tunnels to the others before it stops)
#   3. fly status --app <app>
#   4. scripts/smoke-test.sh --attempts 3 <app>.fly.dev <regions...>
#      (every region answers /health for itself; see that script)
#
# The app name is read from the environment's fly config (its `app = "..."` line), so it
# is written in one place too.
#
# Options:
#   --dry-run           print every command, in order, and run none of them
#   --regions a,b,c     deploy to these regions instead of the environment's list
#   --app NAME          deploy this app instead of the config's
#   --hostname HOST     smoke-test HOST instead of <app>.fly.dev
#   -- OPTIONS...       pass the rest to scripts/smoke-test.sh (e.g. -- --scheme http --port 8080)
#
# Environment: FLYCTL (the fly CLI to run; default `fly`, else `flyctl`), and
# SMOKE_PROBE_TOKEN / SMOKE_PROBE_HOST / SMOKE_PROBE_PATH for the smoke test's tunnel probe.

# The regions each environment runs in, one machine per region. Production's primary
# region (fly.toml's primary_region) must be among them, and staging's likewise.
relay_regions() {
  case $1 in
    production) echo "ams iad sin" ;;
    staging) echo "ams iad" ;;
    *) return 1 ;;
  esac
}

# The fly config of each environment.
relay_fly_config() {
  case $1 in
    production) echo "fly.toml" ;;
    staging) echo "fly.staging.toml" ;;
    *) return 1 ;;
  esac
}

relay_deploy_usage() {
  echo "usage: $relay_deploy_prog [options] [-- <smoke-test options>]"
  echo
  sed -n '/^# Steps/,/^$/{/^$/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

relay_deploy_die() {
  echo "$relay_deploy_prog: $*" >&2
  echo "usage: $relay_deploy_prog [--dry-run] [--regions a,b] [--app NAME] [--hostname HOST] [-- <smoke-test options>]" >&2
  exit 2
}

# Prints a command as `+ word word ...`, quoting only words that need it.
relay_deploy_show() {
  local word line=+
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:,=@%+-]+$ ]]; then
      line+=" $word"
    else
      line+=" $(printf '%q' "$word")"
    fi
  done
  printf '%s\n' "$line"
}

# Prints a command, then runs it unless this is a dry run. A failure stops the deploy
# (set -e in the calling script).
relay_deploy_run() {
  relay_deploy_show "$@"
  if ((relay_deploy_dry_run == 0)); then
    "$@"
  fi
}

relay_deploy() {
  local environment=$1
  shift
  relay_deploy_prog=$(basename "$0")
  relay_deploy_dry_run=0

  local config regions_list app='' hostname='' regions_arg='' smoke_opts=()
  config=$(relay_fly_config "$environment") || relay_deploy_die "unknown environment '$environment'"
  regions_list=$(relay_regions "$environment")

  while (($# > 0)); do
    case $1 in
      -h | --help)
        relay_deploy_usage
        exit 0
        ;;
      --dry-run)
        relay_deploy_dry_run=1
        shift
        ;;
      --regions | --app | --hostname)
        (($# >= 2)) || relay_deploy_die "$1 needs a value"
        case $1 in
          --regions) regions_arg=$2 ;;
          --app) app=$2 ;;
          --hostname) hostname=$2 ;;
        esac
        shift 2
        ;;
      --)
        shift
        smoke_opts=("$@")
        break
        ;;
      *) relay_deploy_die "unknown argument '$1'" ;;
    esac
  done

  # Everything below runs from the repository root: `fly deploy` builds the Dockerfile
  # there, and the config path is relative to it.
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

  [[ -f $config ]] || relay_deploy_die "$config not found in $(pwd)"
  if [[ -z $app ]]; then
    app=$(sed -n "s/^app[[:space:]]*=[[:space:]]*[\"']\([^\"']*\)[\"'].*/\1/p" "$config" | head -n 1)
    [[ -n $app ]] || relay_deploy_die "no app = \"...\" line in $config; pass --app"
  fi
  [[ $app =~ ^[a-z0-9-]+$ ]] || relay_deploy_die "'$app' is not a Fly app name"

  local regions=()
  if [[ -n $regions_arg ]]; then
    IFS=', ' read -r -a regions <<<"$regions_arg"
  else
    read -r -a regions <<<"$regions_list"
  fi
  ((${#regions[@]} > 0)) || relay_deploy_die "no regions to deploy to"
  local region
  for region in "${regions[@]}"; do
    [[ $region =~ ^[a-z0-9]+$ ]] || relay_deploy_die "'$region' is not a Fly region code"
  done
  local region_csv
  region_csv=$(IFS=,; echo "${regions[*]}")
  hostname=${hostname:-$app.fly.dev}

  local fly=${FLYCTL:-}
  if [[ -z $fly ]]; then
    if command -v fly >/dev/null 2>&1 || ((relay_deploy_dry_run)); then
      fly=fly
    elif command -v flyctl >/dev/null 2>&1; then
      fly=flyctl
    else
      echo "$relay_deploy_prog: the fly CLI (fly or flyctl) is not installed: https://fly.io/docs/flyctl/install/" >&2
      exit 2
    fi
  fi

  if ((relay_deploy_dry_run)); then
    echo "# dry run: $environment, app $app, regions ${regions[*]}; nothing is run" >&2
  else
    echo "# deploying $environment: app $app, regions ${regions[*]}" >&2
  fi
  relay_deploy_run "$fly" scale count "${#regions[@]}" --max-per-region 1 \
    --region "$region_csv" --app "$app" --yes
  relay_deploy_run "$fly" deploy --strategy rolling --config "$config" --app "$app"
  relay_deploy_run "$fly" status --app "$app"
  relay_deploy_run scripts/smoke-test.sh --attempts 3 "${smoke_opts[@]}" "$hostname" "${regions[@]}"
}
