import os

from conan import ConanFile
from conan.tools.build import can_run
from conan.tools.cmake import CMake, CMakeToolchain, cmake_layout


class SkillgraftTestPackage(ConanFile):
    settings = "os", "arch", "compiler", "build_type"
    generators = "CMakeDeps"
    test_type = "explicit"

    def requirements(self):
        self.requires(self.tested_reference_str)

    def layout(self):
        cmake_layout(self)

    def generate(self):
        tc = CMakeToolchain(self)
        tc.user_presets_path = False  # leave no CMakeUserPresets.json in the source tree
        skillgraft = self.dependencies[self.tested_reference_str.split("#")[0]]
        tc.cache_variables["SKILLGRAFT_EXPECT_PREFIX"] = skillgraft.package_folder.replace("\\", "/")
        tc.cache_variables["SKILLGRAFT_EXPECT_CUDA"] = bool(skillgraft.options.cuda)
        tc.generate()

    def build(self):
        cmake = CMake(self)
        cmake.configure()
        cmake.build()

    def test(self):
        if can_run(self):
            self.run(os.path.join(self.cpp.build.bindir, "skillgraft_consumer"), env="conanrun")
