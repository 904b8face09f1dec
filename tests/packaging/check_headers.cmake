# cmake -DSOURCE_DIR=<repo> -DWORK_DIR=<scratch> -DINSTALLED_INCLUDE=<dir> -P check_headers.cmake
# Fails unless every file under <repo>/include is in <dir>, byte for byte.
include("${CMAKE_CURRENT_LIST_DIR}/common.cmake")
sg_check_headers("${INSTALLED_INCLUDE}")
