# How mig's libraries are built, exported and installed, in one place.
#
# An installed library keeps its headers under <prefix>/include/mig/<layer>/, and an embedder
# includes them as <mig/engine/source_migration.h>. Public headers include one another by
# relative path ("../transport/stream.h"), so the same text works in the source tree and
# installed, without putting include/mig itself on anyone's include path.
include(GNUInstallDirs)

# mig_library(TARGET EXPORT_NAME [HEADERS h...]): TARGET becomes mig::EXPORT_NAME, here and
# for find_package(mig); its HEADERS are the layer's public interface and nothing else is
# installed. Static or shared follows BUILD_SHARED_LIBS.
function(mig_library target export_name)
  cmake_parse_arguments(ARG "" "" "HEADERS" ${ARGN})
  add_library(mig::${export_name} ALIAS ${target})
  set_target_properties(${target} PROPERTIES
    EXPORT_NAME ${export_name}
    VERSION ${PROJECT_VERSION}
    # Before 1.0 a minor release may break the ABI (semantic versioning's 0.y rule).
    SOVERSION ${PROJECT_VERSION_MAJOR}.${PROJECT_VERSION_MINOR}
    POSITION_INDEPENDENT_CODE ON)
  target_include_directories(${target} PUBLIC
    $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}> $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
  # Warnings and sanitizers are ours: never part of what an embedder links.
  target_link_libraries(${target} PRIVATE $<BUILD_INTERFACE:mig_build_flags>)
  install(TARGETS ${target} EXPORT mig-targets
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT development
    LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT runtime NAMELINK_COMPONENT development
    INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  if(ARG_HEADERS)
    file(RELATIVE_PATH layer ${PROJECT_SOURCE_DIR} ${CMAKE_CURRENT_SOURCE_DIR})
    install(FILES ${ARG_HEADERS} DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/mig/${layer} COMPONENT development)
  endif()
endfunction()
