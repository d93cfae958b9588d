#!/usr/bin/env bash
# One CI job of .github/workflows/ci.yml, stage by stage, so that the same
# steps run on a Debian 12 machine of ours as in the workflow's debian:bookworm
# container. Run from anywhere; it works in the checkout it belongs to.
#
#   .ci/vm-job.sh all SESSION...     setup, kvm, run, report: the whole job on this machine
#   .ci/vm-job.sh setup [SESSION...] Debian packages (as root), the CI venv (nox and
#                                    ktstr[report] from this checkout), `ktstr doctor`, the
#                                    session listing; stops there (boots nothing)
#   .ci/vm-job.sh matrix             the vm_tests job matrix (JSON) from `nox -l --json`
#   .ci/vm-job.sh keys SESSION       the kernel cache key (none for sessions without kernels)
#                                    and an artifact-safe name for SESSION
#   .ci/vm-job.sh kvm                native or sandbox: what the sessions will choose here
#   .ci/vm-job.sh run SESSION...     run the nox sessions, JUnit XML to ktstr-results/
#   .ci/vm-job.sh report             `ktstr stats report` for every run the last `run` made
#
# Stages write their outputs to $GITHUB_OUTPUT when it is set (in the workflow),
# and always to stdout. $KTSTR_CI_DIR (default $RUNNER_TEMP/ktstr-ci, else
# /var/tmp/ktstr-ci) holds the venv and the run marker. The kernel cache is the
# usual one ($KTSTR_CACHE_DIR, else ~/.cache/ktstr).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CI_DIR=${KTSTR_CI_DIR:-${RUNNER_TEMP:-/var/tmp}/ktstr-ci}
VENV=$CI_DIR/venv
RESULTS=$REPO/ktstr-results
MARKER=$CI_DIR/run-started
# Naming a session runs it, whichever catalog kernel it uses.
export KTSTR_VM_KERNELS=${KTSTR_VM_KERNELS:-all}
export DEBIAN_FRONTEND=noninteractive
cd "$REPO"

say() { printf 'vm-job: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

output() {  # output NAME VALUE: a step output in the workflow, a line on stdout
    printf '%s=%s\n' "$1" "$2"
    if [[ -n ${GITHUB_OUTPUT:-} ]]; then
        printf '%s=%s\n' "$1" "$2" >>"$GITHUB_OUTPUT"
    fi
}

debian_packages() {
    grep -v -e '^#' -e '^[[:space:]]*$' ktstr/sessions/debian-packages.txt
}

install_packages() {
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        say "not root on Debian: no packages installed (the sessions name what is missing)"
        return
    fi
    apt-get update -q
    # python3-venv for the CI venv: Debian's own pip refuses to install system-wide.
    debian_packages | xargs apt-get install -y -q \
        python3 python3-pip python3-venv ca-certificates
}

ensure_venv() {  # ensure_venv [EXTRA-REQUIREMENT...]: the CI venv with nox
    if [[ ! -x $VENV/bin/python ]]; then
        mkdir -p "$CI_DIR"
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check nox "$@"
}

listing() {
    "$VENV/bin/python" -m nox -l --json
}

stage_setup() {
    install_packages
    # ktstr as a user installs it (a wheel of this checkout): `ktstr stats report` and
    # `ktstr doctor` come from there; the sessions install their own editable copy.
    ensure_venv "${REPO}[report]"
    "$VENV/bin/ktstr" --version
    # Findings about this host are for the log: the sessions stop on what they need.
    "$VENV/bin/ktstr" doctor || say "ktstr doctor reported problems (above)"
    local sessions
    sessions=$(listing | "$VENV/bin/python" -c \
        'import json, sys; print("\n".join(r["session"] for r in json.load(sys.stdin)))')
    say "nox sessions: $(tr '\n' ' ' <<<"$sessions")"
    local s
    for s in "$@"; do
        grep -qxF -- "$s" <<<"$sessions" || die "no nox session named $s"
    done
}

stage_matrix() {
    ensure_venv
    # The unit/smoke tests and lint need the same Debian container, so they are jobs of the
    # same matrix, ahead of the vm_tests combinations; those that skip wherever they run
    # (a sched_ext scheduler on a kernel without it) get no job.
    local matrix
    matrix=$(listing | "$VENV/bin/python" -m ktstr.sessions.vm matrix |
             "$VENV/bin/python" -c 'import json, sys
from ktstr.sessions import vm
never = {vm.session_name(k, s) for k, s in vm.combinations(vm.catalog()[1])
         if vm.skip_reason(k, s) is not None}
m = json.load(sys.stdin)
print(json.dumps({"session": ["tests", "lint", *(s for s in m["session"] if s not in never)]}))')
    output matrix "$matrix"
}

slug() {  # an artifact name: vm_tests(kernel='6.12', scheduler='eevdf') -> vm_tests-6.12-eevdf
    sed -E -e "s/[a-z_]+='([^']*)'/\\1/g" -e 's/[^A-Za-z0-9._]+/-/g' -e 's/-+$//' <<<"$1"
}

stage_keys() {
    local session=${1:?keys SESSION}
    output slug "$(slug "$session")"
    if [[ $session == lint ]]; then
        output cache-key ""
        output cache-restore ""
        return
    fi
    local kernel
    if [[ $session =~ kernel=\'([^\']+)\' ]]; then
        kernel=${BASH_REMATCH[1]}
    else
        kernel=$(sed -nE 's/^default *= *"([^"]+)".*/\1/p' kernels/versions.toml)
    fi
    # The catalog and fragments (kernels/*) and the Debian kernel sources installed now:
    # a newer linux-source is a new build, saved under a new key.
    local config sources
    config=$(cat kernels/* | sha256sum | cut -c1-16)
    sources=$(dpkg-query -W -f '${Package}=${Version}\n' 'linux-source-*' 2>/dev/null |
              sort | sha256sum | cut -c1-16)
    output cache-key "ktstr-kernels-v1-$kernel-$sources-$config"
    output cache-restore "ktstr-kernels-v1-$kernel-$sources-"
}

stage_kvm() {
    if [[ -e /dev/kvm ]]; then
        say "/dev/kvm is present"
    else
        say "/dev/kvm is absent"
    fi
    # The sessions decide the same way (ktstr.sessions.vm.kvm_usable): this says which.
    local mode
    mode=$("$VENV/bin/python" -c 'from ktstr.sandbox.detect import detect_kvm
s = detect_kvm()
print("native" if s.usable else "sandbox", s.reason)')
    say "VMs run: $mode"
    output mode "${mode%% *}"
}

pytest_posargs() {  # the posargs that give SESSION's pytest run a JUnit file
    local junit
    junit="ktstr-results/junit-$(slug "$1").xml"
    case $1 in
        # vm_tests: posargs replace the suite (tests/vm), so it is named again.
        vm_tests*) printf '%s\n' -- "--junitxml=$junit" tests/vm ;;
        # tests: posargs go to the unit-test run.
        tests) printf '%s\n' -- "--junitxml=$junit" ;;
    esac
}

stage_run() {
    [[ $# -gt 0 ]] || die "run SESSION..."
    mkdir -p "$CI_DIR" "$RESULTS"
    touch "$MARKER"
    local session status=0 args
    for session in "$@"; do
        mapfile -t args < <(pytest_posargs "$session")
        say "nox -s $session ${args[*]}"
        "$VENV/bin/python" -m nox -s "$session" "${args[@]}" || status=1
    done
    return "$status"
}

stage_report() {
    [[ -e $MARKER ]] || { say "no run stage here: nothing to report"; return 0; }
    local run status=0 found=0
    while IFS= read -r run; do
        found=1
        "$VENV/bin/ktstr" stats report "$run" || status=1
        if [[ -n ${GITHUB_STEP_SUMMARY:-} ]]; then
            { printf '```\n'; "$VENV/bin/ktstr" stats show "$run" || true; printf '```\n'; } \
                >>"$GITHUB_STEP_SUMMARY"
        fi
    done < <(find "$RESULTS" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -newer "$MARKER" \
             2>/dev/null | sort)
    [[ $found -eq 1 ]] || say "the sessions wrote no results (skipped, or failed before)"
    return "$status"
}

stage="${1:-}"
[[ $# -gt 0 ]] && shift
case $stage in
    setup) stage_setup "$@" ;;
    matrix) stage_matrix ;;
    keys) stage_keys "$@" ;;
    kvm) stage_kvm ;;
    run) stage_run "$@" ;;
    report) stage_report ;;
    all)
        [[ $# -gt 0 ]] || die "all SESSION..."
        stage_setup "$@"
        stage_kvm
        status=0
        stage_run "$@" || status=1
        stage_report || status=1
        exit "$status"
        ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;;
esac
