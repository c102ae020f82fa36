# What `cmake --install` puts where, and the Debian packages CPack makes of it:
#   mig         the tools, the guest image and the man pages (component runtime, with the
#               shared libraries when BUILD_SHARED_LIBS is on)
#   libmig-dev  headers, the libraries for linking, and the CMake and pkg-config files
#               (component development)
include(CMakePackageConfigHelpers)

install(TARGETS mig-vm mig-send mig-recv mig-ctl mig-sim RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT runtime)
install(FILES ${MIG_GUEST_IMAGE} DESTINATION ${CMAKE_INSTALL_DATADIR}/mig COMPONENT runtime)

# Man pages, made from each tool's --help and --version by help2man, so they cannot drift
# from the options; tools/man/TOOL.h2m adds what --help does not say.
find_program(HELP2MAN help2man REQUIRED)
foreach(tool mig-vm mig-send mig-recv mig-ctl mig-sim)
  set(page ${PROJECT_BINARY_DIR}/man/${tool}.1)
  set(extra ${PROJECT_SOURCE_DIR}/tools/man/${tool}.h2m)
  add_custom_command(OUTPUT ${page}
    COMMAND ${CMAKE_COMMAND} -E make_directory ${PROJECT_BINARY_DIR}/man
    COMMAND ${HELP2MAN} --no-info --no-discard-stderr --section 1 --include ${extra}
            --include ${PROJECT_SOURCE_DIR}/tools/man/common.h2m --output ${page} $<TARGET_FILE:${tool}>
    DEPENDS ${tool} ${extra} ${PROJECT_SOURCE_DIR}/tools/man/common.h2m VERBATIM)
  list(APPEND man_pages ${page})
endforeach()
add_custom_target(mig_man ALL DEPENDS ${man_pages})
install(FILES ${man_pages} DESTINATION ${CMAKE_INSTALL_MANDIR}/man1 COMPONENT runtime)

# find_package(mig CONFIG)
set(config_dir ${CMAKE_INSTALL_LIBDIR}/cmake/mig)
install(EXPORT mig-targets NAMESPACE mig:: DESTINATION ${config_dir} COMPONENT development)
configure_package_config_file(cmake/mig-config.cmake.in ${PROJECT_BINARY_DIR}/mig-config.cmake
  INSTALL_DESTINATION ${config_dir})
# Before 1.0 only the same MAJOR.MINOR is compatible (semantic versioning's 0.y rule).
write_basic_package_version_file(${PROJECT_BINARY_DIR}/mig-config-version.cmake COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/mig-config.cmake ${PROJECT_BINARY_DIR}/mig-config-version.cmake
  DESTINATION ${config_dir} COMPONENT development)

# pkg-config: relocatable (the prefix is found from the .pc file's own place), so an
# unpacked package works wherever it lies. Static libraries need their dependencies and the
# C++ runtime on every link line, not only with --static.
set(pc_dir ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
file(RELATIVE_PATH PC_PREFIX_FROM_PCDIR /prefix/${pc_dir} /prefix)
string(REGEX REPLACE "/$" "" PC_PREFIX_FROM_PCDIR "${PC_PREFIX_FROM_PCDIR}")
if(BUILD_SHARED_LIBS)
  set(PC_REQUIRES "Requires.private")
  set(PC_STATIC_LIBS "")
else()
  set(PC_REQUIRES "Requires")
  set(PC_STATIC_LIBS " -lxxhash -lzstd -lstdc++ -lm -pthread")
endif()
configure_file(cmake/mig.pc.in ${PROJECT_BINARY_DIR}/mig.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/mig.pc DESTINATION ${pc_dir} COMPONENT development)

# cpack -G DEB (in the build folder): mig_VERSION_amd64.deb and libmig-dev_VERSION_amd64.deb.
set(CPACK_PACKAGE_NAME mig)
set(CPACK_PACKAGE_VENDOR "the mig developers")
set(CPACK_PACKAGE_CONTACT "mig developers <mig@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "${PROJECT_DESCRIPTION}")
set(CPACK_GENERATOR DEB)
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_COMPONENTS_ALL runtime development)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_RUNTIME_PACKAGE_NAME mig)
set(CPACK_DEBIAN_RUNTIME_PACKAGE_SHLIBDEPS ON)  # the runtime libraries, from the binaries' links
set(CPACK_DEBIAN_DEVELOPMENT_PACKAGE_NAME libmig-dev)
set(CPACK_DEBIAN_DEVELOPMENT_PACKAGE_SECTION libdevel)
# The headers and static libraries need the dependencies' own -dev packages to link against.
set(CPACK_DEBIAN_DEVELOPMENT_PACKAGE_DEPENDS
  "mig (= ${PROJECT_VERSION}), libssl-dev, liburing-dev, libnbd-dev, libzstd-dev, libxxhash-dev, pkg-config")
set(CPACK_COMPONENT_RUNTIME_DESCRIPTION "live migration of KVM virtual machines: mig-vm, mig-send, mig-recv, mig-ctl")
set(CPACK_COMPONENT_DEVELOPMENT_DESCRIPTION "mig's migration engine as a library: C and C++ headers, CMake and pkg-config files")
include(CPack)
