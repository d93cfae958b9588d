"""Fragment parsing, the Kconfig index and the verification messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from ktstr.errors import KtstrError
from ktstr.kernel.catalog import fragments_dir
from ktstr.kernel.kconfig import (
    KconfigIndex,
    evaluate,
    expr_symbols,
    load_fragment,
    merge_fragments,
    parse_config,
    parse_fragment,
    render_fragment,
    verify,
)

FAKE_TREE = {
    "Kconfig": """
mainmenu "fake"
source "init/Kconfig"
source "arch/$(SRCARCH)/Kconfig"
""",
    "init/Kconfig": """
config NET
\tbool "Networking"

menuconfig NETDEVICES
\tbool "Network device support"
\tdepends on NET

if NETDEVICES

config TUN
\ttristate "TUN/TAP"
\tdepends on INET && \\
\t\t!BROKEN
\thelp
\t  The help text mentions keywords that must not count:
\t  config FAKE_FROM_HELP
\t  depends on NOTHING

endif # NETDEVICES

config INET
\tbool "TCP/IP"
\tdepends on NET

config NEEDS_MENU
\tbool "needs menu"

menu "Virtualization"
\tdepends on HAVE_VIRT

config KVM
\tbool "KVM"

endmenu

config SELECTED_ONLY
\tbool
\tdefault n

choice
\tprompt "Kernel compression"

config KERNEL_XZ
\tbool "XZ"

config KERNEL_LZ4
\tbool "LZ4"

endchoice

config NR_CPUS
\tint "Maximum CPUs"
\trange 2 512
\tdefault 64
""",
    "arch/x86/Kconfig": """
config X86_ONLY
\tbool "x86 only"
""",
    "arch/arm/Kconfig": """
config ARM_ONLY
\tbool "arm only"
""",
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel, text in FAKE_TREE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.lstrip("\n"))
    return tmp_path


def test_parse_fragment_values_and_unset() -> None:
    frag = parse_fragment(
        "# comment\n\nCONFIG_A=y\nCONFIG_NR=256\nCONFIG_S=\"x y\"\n# CONFIG_B is not set\n"
    )
    assert frag.options == {"A": "y", "NR": "256", "S": '"x y"', "B": None}


def test_parse_fragment_rejects_garbage_with_line_number() -> None:
    with pytest.raises(KtstrError, match=r"frag:3: expected CONFIG_NAME=value"):
        parse_fragment("CONFIG_A=y\n\nA=y\n", "frag")
    with pytest.raises(KtstrError, match="CONFIG_EMPTY="):
        parse_fragment("CONFIG_EMPTY=\n", "frag")


def test_merge_later_fragment_wins_and_render_roundtrips() -> None:
    a = parse_fragment("CONFIG_A=y\nCONFIG_B=y\n")
    b = parse_fragment("# CONFIG_A is not set\nCONFIG_C=m\n")
    merged = merge_fragments([a, b])
    assert merged == {"A": None, "B": "y", "C": "m"}
    assert parse_fragment(render_fragment(merged)).options == merged


def test_project_fragments_parse() -> None:
    test = load_fragment(fragments_dir() / "ktstr.kconfig").options
    sandbox = load_fragment(fragments_dir() / "sandbox.kconfig").options
    assert test["SCHED_CLASS_EXT"] == "y" and test["DEBUG_INFO_BTF"] == "y"
    assert sandbox["KVM"] == "y"
    scenario = load_fragment(fragments_dir() / "scenario.kconfig").options
    assert scenario["CFS_BANDWIDTH"] == scenario["UCLAMP_TASK_GROUP"] == scenario["MEMCG"] == "y"
    from ktstr.kernel.pipeline import FLAVOURS

    assert "scenario.kconfig" in FLAVOURS["test"] and "scenario.kconfig" not in FLAVOURS["sandbox"]


def test_parse_config_ignores_unset_and_comments() -> None:
    text = "#\n# Linux\n#\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_NR_CPUS=64\n"
    assert parse_config(text) == {"A": "y", "NR_CPUS": "64"}


def test_index_follows_sources_if_blocks_and_arch(tree: Path) -> None:
    idx = KconfigIndex(tree)
    (tun,) = idx.defs("TUN")
    assert tun.inherited == ["NETDEVICES"]
    assert tun.depends == ["INET && !BROKEN"]
    assert tun.location == "init/Kconfig:10"
    assert idx.defs("X86_ONLY") and not idx.defs("ARM_ONLY")
    assert not idx.defs("FAKE_FROM_HELP")
    assert idx.defs("KVM")[0].inherited == ["HAVE_VIRT"]
    assert idx.defs("NEEDS_MENU")[0].inherited == []  # defined before the menu
    assert idx.defs("KERNEL_LZ4")[0].in_choice
    assert not idx.defs("SELECTED_ONLY")[0].has_prompt


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("A", 2), ("B", 0), ("M", 1), ("A && B", 0), ("A || B", 2), ("!B", 2),
        ("A && (B || !C)", 2), ("M && A", 1), ("NR = 64", 2), ("NR != 64", 0),
        ("NR > 8", 2), ('S = "x"', 2), ("$(cc-option,-mfoo) && A", 2), ("A = y", 2),
    ],
)
def test_evaluate(expr: str, expected: int) -> None:
    config = {"A": "y", "M": "m", "NR": "64", "S": '"x"'}
    assert evaluate(expr, config) == expected


def test_expr_symbols() -> None:
    assert expr_symbols("KVM && (CPU_SUP_AMD || !X86_32) && y") == ["KVM", "CPU_SUP_AMD", "X86_32"]


def test_verify_reports_dropped_option_with_unset_dependency(tree: Path) -> None:
    requested = {"NET": "y", "TUN": "y", "INET": "y"}
    config = {"NET": "y", "INET": "y"}  # olddefconfig dropped TUN: NETDEVICES is unset
    result = verify(requested, config, lambda: KconfigIndex(tree))
    assert result.unavailable == []
    (dropped,) = result.dropped
    assert dropped.name == "TUN"
    assert "depends on NETDEVICES (unset: CONFIG_NETDEVICES)" in dropped.reason
    assert "init/Kconfig:10" in dropped.reason
    with pytest.raises(KtstrError) as err:
        result.raise_if_dropped("6.12 test kernel")
    message = str(err.value)
    assert "CONFIG_TUN=y was dropped" in message and "CONFIG_NETDEVICES" in message
    assert "\n" not in message


def test_verify_names_each_unset_symbol_of_a_false_expression(tree: Path) -> None:
    result = verify({"TUN": "y"}, {"NET": "y", "NETDEVICES": "y"}, lambda: KconfigIndex(tree))
    assert "depends on INET && !BROKEN (unset: CONFIG_INET)" in result.dropped[0].reason


def test_verify_names_a_set_symbol_that_a_negation_forbids(tree: Path) -> None:
    config = {"NET": "y", "NETDEVICES": "y", "INET": "y", "BROKEN": "y"}
    result = verify({"TUN": "y"}, config, lambda: KconfigIndex(tree))
    assert "(set: CONFIG_BROKEN)" in result.dropped[0].reason


def test_verify_unknown_option_is_not_available_not_fatal(tree: Path) -> None:
    result = verify({"SCHED_CLASS_EXT": "y", "NET": "y"}, {"NET": "y"},
                    lambda: KconfigIndex(tree))
    assert result.unavailable == ["SCHED_CLASS_EXT"]
    assert result.dropped == []
    result.raise_if_dropped("6.1")  # does not raise


def test_verify_choice_value_and_promptless_reasons(tree: Path) -> None:
    requested = {"KERNEL_LZ4": "y", "SELECTED_ONLY": "y", "NR_CPUS": "1024"}
    config = {"KERNEL_XZ": "y", "NR_CPUS": "512"}
    result = verify(requested, config, lambda: KconfigIndex(tree))
    reasons = {d.name: d for d in result.dropped}
    assert "choice" in reasons["KERNEL_LZ4"].reason
    assert "no prompt" in reasons["SELECTED_ONLY"].reason
    assert reasons["NR_CPUS"].got == "512"
    assert "CONFIG_NR_CPUS=1024 was dropped (now =512)" in reasons["NR_CPUS"].message()


def test_verify_skips_the_kconfig_scan_when_everything_survived() -> None:
    def no_index() -> KconfigIndex:
        raise AssertionError("the Kconfig tree must not be read")

    result = verify({"A": "y", "B": None, "N": "8"}, {"A": "y", "B": "y", "N": "8"}, no_index)
    assert result.unavailable == [] and result.dropped == []


def test_index_rejects_non_kernel_tree(tmp_path: Path) -> None:
    with pytest.raises(KtstrError, match="not a kernel source tree"):
        KconfigIndex(tmp_path)
