# P11KMS_PROBE_CFLAG(FLAG, VARIABLE): append FLAG to VARIABLE when the compiler accepts it.
AC_DEFUN([P11KMS_PROBE_CFLAG], [
  AC_MSG_CHECKING([whether $CC accepts $1])
  p11kms_save_CFLAGS="$CFLAGS"
  CFLAGS="$CFLAGS -Werror $1"
  AC_COMPILE_IFELSE([AC_LANG_PROGRAM([], [])],
    [AC_MSG_RESULT([yes]); $2="$$2 $1"], [AC_MSG_RESULT([no])])
  CFLAGS="$p11kms_save_CFLAGS"
])
# P11KMS_PROBE_LDFLAG(FLAG, VARIABLE): append FLAG to VARIABLE when the linker accepts it.
AC_DEFUN([P11KMS_PROBE_LDFLAG], [
  AC_MSG_CHECKING([whether the linker accepts $1])
  p11kms_save_LDFLAGS="$LDFLAGS"
  LDFLAGS="$LDFLAGS -Werror $1"
  AC_LINK_IFELSE([AC_LANG_PROGRAM([], [])],
    [AC_MSG_RESULT([yes]); $2="$$2 $1"], [AC_MSG_RESULT([no])])
  LDFLAGS="$p11kms_save_LDFLAGS"
])
