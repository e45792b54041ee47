# CUDA kernels: recmeta_sdk._core_cuda (included from CMakeLists.txt).
#
# RECMETA_ENABLE_CUDA: AUTO (default) builds them when CMake finds a CUDA compiler
# (check_language(CUDA)); ON requires one (configuration fails without: what CI's
# .ci/cuda_compile uses); OFF never builds them. RECMETA_CUDA_ARCHITECTURES lists the
# targets (default 80;90: A100- and H100/H200-class cards, SASS for both plus PTX of the
# newest for later cards). The module links the static CUDA runtime, so importing it
# needs no CUDA installation; the driver is loaded on first use.
set(RECMETA_CUDA_ARCHITECTURES "80-real;90" CACHE STRING "CUDA architectures of the CUDA kernels")

set(RECMETA_BUILD_CUDA OFF)
string(TOUPPER "${RECMETA_ENABLE_CUDA}" _recmeta_cuda_mode)
if(_recmeta_cuda_mode STREQUAL "AUTO")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(RECMETA_BUILD_CUDA ON)
  else()
    message(STATUS "recmeta: no CUDA compiler found, the CUDA kernels are not built")
  endif()
elseif(RECMETA_ENABLE_CUDA)
  set(RECMETA_BUILD_CUDA ON)
endif()

if(RECMETA_BUILD_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES ${RECMETA_CUDA_ARCHITECTURES})
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  file(GLOB RECMETA_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu)
  add_library(recmeta_cuda STATIC ${RECMETA_CUDA_SOURCES})
  target_include_directories(recmeta_cuda PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/csrc/include)
  set_target_properties(recmeta_cuda PROPERTIES
    CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON POSITION_INDEPENDENT_CODE ON)
  target_compile_options(recmeta_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo>)
  target_link_libraries(recmeta_cuda PUBLIC CUDA::cudart_static)

  pybind11_add_module(_core_cuda MODULE ${CMAKE_CURRENT_SOURCE_DIR}/bindings/cuda/module_cuda.cpp)
  target_link_libraries(_core_cuda PRIVATE recmeta_cuda)
  target_compile_options(_core_cuda PRIVATE -O2)
  install(TARGETS _core_cuda DESTINATION recmeta_sdk)
endif()
message(STATUS "recmeta: CUDA kernels      ${RECMETA_BUILD_CUDA} (RECMETA_ENABLE_CUDA=${RECMETA_ENABLE_CUDA}, architectures ${CMAKE_CUDA_ARCHITECTURES})")
