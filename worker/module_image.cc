#include "worker/module_image.h"

#include <elf.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace gpuq::worker {
namespace {

Status Malformed(const std::string& why) {
  return Status(Code::kInvalid, "the module image is not a well-formed ELF file: " + why);
}

// a + b, or the largest uint64 where that overflows.
uint64_t SaturatingAdd(uint64_t a, uint64_t b) {
  return a > std::numeric_limits<uint64_t>::max() - b ? std::numeric_limits<uint64_t>::max()
                                                       : a + b;
}

// [offset, offset + size) lies within an image of `n` bytes.
bool Within(uint64_t offset, uint64_t size, uint64_t n) { return offset <= n && size <= n - offset; }

template <typename T>
T Read(std::string_view image, uint64_t offset) {
  T v;
  std::memcpy(&v, image.data() + offset, sizeof v);
  return v;
}

}  // namespace

bool IsElfImage(std::string_view image) {
  return image.size() >= SELFMAG && std::memcmp(image.data(), ELFMAG, SELFMAG) == 0;
}

StatusOr<uint64_t> ModuleDeviceBytes(std::string_view image) {
  const uint64_t n = image.size();
  if (n < sizeof(Elf64_Ehdr) || !IsElfImage(image)) return Malformed("no ELF header");
  const auto eh = Read<Elf64_Ehdr>(image, 0);
  if (eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_ident[EI_DATA] != ELFDATA2LSB) {
    return Malformed("not a 64-bit little-endian ELF file");
  }
  if (eh.e_shentsize != sizeof(Elf64_Shdr)) return Malformed("unexpected section header size");
  const uint64_t count = eh.e_shnum;
  if (count == 0 || !Within(eh.e_shoff, count * sizeof(Elf64_Shdr), n)) {
    return Malformed("section headers outside the image");
  }
  std::vector<Elf64_Shdr> sections(count);
  for (uint64_t i = 0; i < count; ++i) {
    sections[i] = Read<Elf64_Shdr>(image, eh.e_shoff + i * sizeof(Elf64_Shdr));
    const Elf64_Shdr& s = sections[i];
    if (s.sh_type != SHT_NOBITS && s.sh_type != SHT_NULL && !Within(s.sh_offset, s.sh_size, n)) {
      return Malformed("section " + std::to_string(i) + " outside the image");
    }
  }
  if (eh.e_shstrndx >= count || sections[eh.e_shstrndx].sh_type != SHT_STRTAB) {
    return Malformed("no section name table");
  }
  const Elf64_Shdr& names = sections[eh.e_shstrndx];
  auto name_of = [&](const Elf64_Shdr& s) -> std::string_view {
    if (s.sh_name >= names.sh_size) return {};
    std::string_view table = image.substr(names.sh_offset, names.sh_size);
    table.remove_prefix(s.sh_name);
    return table.substr(0, table.find('\0'));
  };

  // Each allocated section's extent: its size, or past it to its furthest
  // symbol.
  std::vector<uint64_t> extent(count, 0);
  std::vector<bool> counted(count, false);
  for (uint64_t i = 0; i < count; ++i) {
    const Elf64_Shdr& s = sections[i];
    if (!(s.sh_flags & SHF_ALLOC)) continue;
    if (name_of(s).starts_with(".nv.shared")) continue;  // per block, on the multiprocessor
    counted[i] = true;
    extent[i] = s.sh_size;
  }
  for (const Elf64_Shdr& table : sections) {
    if (table.sh_type != SHT_SYMTAB && table.sh_type != SHT_DYNSYM) continue;
    if (table.sh_entsize != sizeof(Elf64_Sym)) return Malformed("unexpected symbol size");
    for (uint64_t at = 0; at + sizeof(Elf64_Sym) <= table.sh_size; at += sizeof(Elf64_Sym)) {
      const auto sym = Read<Elf64_Sym>(image, table.sh_offset + at);
      if (sym.st_shndx == SHN_UNDEF || sym.st_shndx >= SHN_LORESERVE) continue;
      if (sym.st_shndx >= count) return Malformed("a symbol of a section that does not exist");
      if (!counted[sym.st_shndx]) continue;
      extent[sym.st_shndx] =
          std::max(extent[sym.st_shndx], SaturatingAdd(sym.st_value, sym.st_size));
    }
  }
  uint64_t total = 0;
  for (uint64_t e : extent) total = SaturatingAdd(total, e);
  return total;
}

}  // namespace gpuq::worker
