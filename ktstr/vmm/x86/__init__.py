"""x86_64 guest-visible structures: registers and paging, CPUID, ACPI and MP tables."""
