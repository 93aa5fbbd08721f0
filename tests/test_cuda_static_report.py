"""The parsing and counting of scripts/cuda_static_report.py on synthetic compiler output
(no nvcc needed): ptxas resource lines, kernel names, resident warps, and the cheapest /
costliest path through a slab loop in SASS."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cuda_static_report",
                                               ROOT / "scripts" / "cuda_static_report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

MANGLED = ("_ZN6mpncov4cuda54_GLOBAL__N__a61b9078_15_sqrtm_kernel_cu_bbf21a46_1576614"
           "product_kernelIfEEvNS1_11ProductArgsIT_EE")


def test_short_names():
    assert report.short_name(MANGLED) == "product_kernel<float>"
    prep = MANGLED.replace("14product_kernelIfEEvNS1_11ProductArgsIT_EE",
                           "15sym_prep_kernelIdLb1EEEvPKT_")
    assert report.short_name(prep) == "sym_prep_kernel<double, backward>"
    assert report.is_tile_kernel(MANGLED)
    # the file name in the anonymous namespace must not make a prep kernel a tile kernel
    covpool_file_prep = ("_ZN6mpncov4cuda56_GLOBAL__N__fd2505ec_17_covpool_kernel_cu_c8c54cf1_"
                         "1552614sym_sum_kernelIfEEvPKT_PS3_il")
    assert not report.is_tile_kernel(covpool_file_prep)
    # the Gram-space pipeline's tile kernel (and its TF32 variant) is checked like the others;
    # its file name ("gram_kernel_cu") is not taken for a kernel name
    gram = ("_ZN6mpncov4cuda52_GLOBAL__N__11b45367_14_gram_kernel_cu_4b66606d_944319"
            "gram_product_kernelIfLi1EEEvNS1_15GramProductArgsIT_EE")
    assert report.short_name(gram) == "gram_product_kernel<float, tf32>"
    assert report.is_tile_kernel(gram) and report.is_mma_kernel(gram)
    finish = gram.replace("19gram_product_kernelIfLi1EEEvNS1_15GramProductArgsIT_EE",
                          "18gram_finish_kernelIfEEvPT_")
    assert report.short_name(finish) == "gram_finish_kernel<float>"
    assert not report.is_tile_kernel(finish)


def test_parse_ptxas():
    log = (f"ptxas info    : Compiling entry function '{MANGLED}' for 'sm_90'\n"
           "ptxas info    : Function properties for x\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 17536 bytes smem\n")
    assert report.parse_ptxas(log) == [(MANGLED, 168, 4, 12, 8, 17536)]


def test_resident_warps():
    # 168 registers x 64 threads: 6 blocks (12 warps); 201 registers: 4 blocks (8 warps).
    assert report.resident_warps(90, 168, 17536, 64) == 12
    assert report.resident_warps(90, 201, 8704, 64) == 8
    assert report.resident_warps(90, 32, 0, 256) == 64


def _sass(lines):
    out = ["\t\tFunction : kern"]
    for addr, text in lines:
        out.append(f"        /*{addr:04x}*/                   {text} ;   /* 0x0 */")
    return report.sass_functions("\n".join(out))["kern"]


def test_loop_paths_take_both_branches_and_require_staging():
    # head: @P2 BRA past the load (a path that stages nothing: not a slab's cost); LDG;
    # @P0 BRA else; (then) 2x STS; BRA join; (else) 1x STS; join: 2x FFMA, BAR, back edge.
    body = _sass([
        (0x00, "@P2 BRA 0x60"),
        (0x08, "LDG.E.128 R4, [R2.64]"),
        (0x10, "@P0 BRA 0x50"),
        (0x20, "STS [R1], R4"),
        (0x30, "STS [R1+0x4], R5"),
        (0x40, "BRA 0x60"),
        (0x50, "STS.128 [R1], R4"),
        (0x60, "FFMA R8, R4, R5, R8"),
        (0x70, "FFMA R9, R4, R5, R9"),
        (0x80, "BAR.SYNC.DEFER_BLOCKING 0x0"),
        (0x90, "@P1 BRA 0x0"),
    ])
    cheap, costly = report.loop_paths(body, 2)
    assert cheap == {"LDG": 1, "control": 3, "STS": 1, "FMA": 2, "BAR": 1}
    assert costly["STS"] == 2 and costly["FMA"] == 2 and costly["LDG"] == 1
    assert report.loop_paths(body, 3) is None  # no loop with 3 FMAs


def test_on_chip_geometry_matches_the_kernels():
    # The report's copy of sqrtm_on_chip.cuh's formulas: 136 cells of 8 x 8 at C = 128
    # (160 threads); the largest sides whose blocks fit an opt-in limit are the ones the
    # emulated launcher accepts (test_cuda_emulation.py::test_sqrtm_on_chip_shared_memory_limits).
    assert report.on_chip_threads(128, "float") == 160
    assert report.on_chip_threads(96, "double") == 160
    assert report.on_chip_threads(5, "float") == 32
    assert report.on_chip_smem(128, "float", False) == 3 * 128 * 128 * 4
    assert report.on_chip_smem(128, "float", True) == (3 * 128 + 32) * 128 * 4

    def largest(dtype, backward, limit):
        scratch = 33 * (4 if dtype == "float" else 8)
        return max(n for n in range(1, 129)
                   if report.on_chip_smem(n, dtype, backward) + scratch <= limit)

    assert (largest("float", False, 163 * 1024), largest("float", True, 163 * 1024)) == (115, 112)
    assert (largest("double", False, 227 * 1024), largest("double", True, 227 * 1024)) == (96, 90)
    assert report.resident_warps(90, 168, 144 + report.on_chip_smem(128, "float", True), 160) == 5
    assert report.resident_warps(80, 168, 144 + report.on_chip_smem(128, "float", False), 160) == 0


def test_short_names_of_the_tf32_variants():
    base = "_ZN6mpncov4cuda54_GLOBAL__N__c4e53ba4_15_sqrtm_kernel_cu_52226bb8_1139214product_kernelI"
    assert report.short_name(base + "fLi0EEEvNS1_11ProductArgsIT_EE") == "product_kernel<float>"
    assert report.short_name(base + "fLi1EEEvNS1_11ProductArgsIT_EE") == "product_kernel<float, tf32>"
    assert report.short_name(base + "fLi2EEEvNS1_11ProductArgsIT_EE") == (
        "product_kernel<float, 3xtf32>")
    assert report.is_mma_kernel(base + "fLi2EEEvNS1_11ProductArgsIT_EE")
    assert report.is_tile_kernel(base + "fLi1EEEvNS1_11ProductArgsIT_EE")
    assert report.classify("HMMA.1688.F32.TF32") == "MMA" and report.classify("STL") == "local"
