"""Conan 2 recipe for skillgraft, a header-only C++20 library.

    conan create . -pr:h packaging/conan/debian-system -pr:b default     # offline, Debian deps
    conan create . -pr:h <your profile with compiler.cppstd=20>          # ConanCenter deps

The package is what `cmake --install` produces: include/ and the project's own CMake
package in share/cmake/skillgraft. CMake consumers therefore use exactly the same
find_package(skillgraft CONFIG) file as everyone else (targets skillgraft::skillgraft and,
with -o "skillgraft/*:cuda=True", the `cuda` component skillgraft::cuda); CMakeDeps does
not generate a second, different one. Other generators (PkgConfigDeps, MSBuildDeps, ...)
get the include directory and dependencies from package_info().
"""
import os
import re

from conan import ConanFile
from conan.tools.build import check_min_cppstd
from conan.tools.cmake import CMake, CMakeDeps, CMakeToolchain, cmake_layout
from conan.tools.files import copy, load

required_conan_version = ">=2.0.9"


class SkillgraftConan(ConanFile):
    name = "skillgraft"
    description = ("Compile-time trainability recipes for fine-tuning LLaMA/Qwen2-style "
                   "transformers: frozen parameters cost no gradient work or memory.")
    topics = ("transformers", "fine-tuning", "header-only", "eigen", "hana")
    license = "Apache-2.0"
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    options = {
        "openmp": [True, False],  # skillgraft::skillgraft links OpenMP::OpenMP_CXX
        "cuda": [True, False],    # installs the CMake component `cuda` (skillgraft::cuda)
        "blas": ["openblas", "eigen"],  # the CPU GEMM (SKILLGRAFT_BLAS; eigen: Eigen's own, no library)
    }
    default_options = {
        "openmp": True,
        "cuda": False,
        "blas": "openblas",
        "openblas/*:dynamic_arch": True,  # kernels chosen for the running CPU, never at build time
        "boost/*:header_only": True,  # only Boost.Hana (headers) is used
    }
    exports_sources = ("CMakeLists.txt", "cmake/*", "include/*", "LICENSE*")
    no_copy_source = True

    def set_version(self):
        if self.version:
            return
        top = load(self, os.path.join(self.recipe_folder, "CMakeLists.txt"))
        match = re.search(r"project\(\s*skillgraft\s+VERSION\s+([0-9]+\.[0-9]+\.[0-9]+)", top)
        if not match:
            raise RuntimeError("skillgraft: cannot read the version from CMakeLists.txt")
        self.version = match.group(1)

    def layout(self):
        cmake_layout(self)

    def requirements(self):
        # Header-only: the dependencies' headers are part of skillgraft's interface.
        self.requires("eigen/[>=3.4.0 <4]", transitive_headers=True)
        self.requires("xtensor/[>=0.24.3 <0.26]", transitive_headers=True)
        self.requires("boost/[>=1.74.0]", transitive_headers=True)
        self.requires("nlohmann_json/[>=3.11 <4]", transitive_headers=True)
        if self.options.blas == "openblas":
            self.requires("openblas/[>=0.3.21]", transitive_headers=True)

    def validate(self):
        check_min_cppstd(self, 20)

    def package_id(self):
        # The package is the same for every compiler, architecture and build type and for
        # every dependency version in range; the options change the installed CMake config.
        self.info.settings.clear()
        self.info.requires.clear()

    def generate(self):
        tc = CMakeToolchain(self)
        tc.cache_variables["SKILLGRAFT_INSTALL"] = True
        tc.cache_variables["SKILLGRAFT_OPENMP"] = bool(self.options.openmp)
        tc.cache_variables["SKILLGRAFT_CUDA"] = bool(self.options.cuda)
        tc.cache_variables["SKILLGRAFT_BLAS"] = str(self.options.blas)
        tc.cache_variables["SKILLGRAFT_BUILD_TESTS"] = False
        tc.cache_variables["SKILLGRAFT_BUILD_BENCHMARKS"] = False
        tc.cache_variables["SKILLGRAFT_BUILD_EXAMPLES"] = False
        tc.generate()
        CMakeDeps(self).generate()

    def build(self):
        # Configuring checks that every dependency is found; there is nothing to compile.
        cmake = CMake(self)
        cmake.configure()

    def package(self):
        copy(self, "LICENSE*", src=self.source_folder, dst=os.path.join(self.package_folder, "licenses"))
        cmake = CMake(self)
        cmake.install()

    def package_info(self):
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
        self.cpp_info.includedirs = ["include"]
        # CMake: use the installed skillgraftConfig.cmake (find_dependency for Eigen3, xtensor,
        # Boost, nlohmann_json, OpenMP; the cuda component) instead of a CMakeDeps-generated file.
        self.cpp_info.set_property("cmake_find_mode", "none")
        self.cpp_info.builddirs = [os.path.join("share", "cmake", "skillgraft")]
        # Everything else.
        self.cpp_info.set_property("pkg_config_name", "skillgraft")
        self.cpp_info.requires = ["eigen::eigen", "xtensor::xtensor", "boost::headers", "nlohmann_json::nlohmann_json"]
        if self.options.blas == "openblas":
            self.cpp_info.requires.append("openblas::openblas")
            self.cpp_info.defines = ["SKILLGRAFT_BLAS_OPENBLAS"]
        if self.options.openmp and self.settings.get_safe("compiler") in ("gcc", "clang"):
            self.cpp_info.cxxflags = ["-fopenmp"]
            self.cpp_info.sharedlinkflags = ["-fopenmp"]
            self.cpp_info.exelinkflags = ["-fopenmp"]
