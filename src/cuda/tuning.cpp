#include "cuda/tuning.hpp"

#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "cuda/kernel_cache.hpp"
#include "flashjit/flashjit.h"

namespace flashjit::cuda {
namespace {

constexpr const char* kHeader = "flashjit tuning 1";
// In save_tuning's entries: the class's built-in choice measured best (its entry is dropped).
constexpr const char* kBuiltIn = "built-in";

struct TunedChoice {
  std::string tiles;  // FLASHJIT_CUDA_TILES text
  double tflops = 0;  // as measured by the tuner
};

struct TuningTable {
  std::map<std::string, TunedChoice> tiles;  // by class key
  std::string problem;                       // why the file is ignored ("" when it is used or absent)
  bool present = false;
};

std::mutex g_mutex;
std::map<std::string, TuningTable> g_tables;  // by file path

std::string file_name_part(const std::string& device_name) {
  std::string out;
  for (char c : device_name) {
    const bool keep = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
                      c == '-';
    out += keep ? c : '_';
  }
  return out;
}

std::string tuning_path(const std::string& device_name, int arch) {
  return str_cat(cache_base_directory(), "/", fj_version(), "/tuning/sm", arch, "-", file_name_part(device_name),
                 ".txt");
}

std::string checksum_text(const std::string& body) {
  char buffer[17];
  std::snprintf(buffer, sizeof buffer, "%016llx", static_cast<unsigned long long>(fnv1a(body)));
  return buffer;
}

// The table of a file, or the reason it is not used.
TuningTable read_table(const std::string& path, const std::string& device_name, int arch) {
  TuningTable table;
  std::ifstream in(path, std::ios::binary);
  if (!in) return table;  // nothing tuned
  table.present = true;
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t checksum_at = text.rfind("checksum ");
  const auto fail = [&](const std::string& why) {
    table.tiles.clear();
    table.problem = why;
    return table;
  };
  if (text.compare(0, std::string(kHeader).size(), kHeader) != 0) return fail("not a flashjit tuning file");
  if (checksum_at == std::string::npos || (checksum_at > 0 && text[checksum_at - 1] != '\n')) {
    return fail("no checksum line");
  }
  std::string stored = text.substr(checksum_at + 9);
  while (!stored.empty() && (stored.back() == '\n' || stored.back() == '\r')) stored.pop_back();
  const std::string body = text.substr(0, checksum_at);
  if (stored != checksum_text(body)) return fail("its checksum does not match its contents");
  std::istringstream lines(body);
  std::string line;
  std::getline(lines, line);  // the header
  unsigned named = 0;  // bits: the device, arch and version lines seen, each required
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::string kind;
    fields >> kind;
    if (kind == "device") {
      std::string name;
      std::getline(fields >> std::ws, name);
      if (name != device_name) return fail(str_cat("it was measured on ", name, ", not ", device_name));
      named |= 1;
    } else if (kind == "arch") {
      int value = 0;
      fields >> value;
      if (value != arch) return fail(str_cat("it is for sm_", value, ", not sm_", arch));
      named |= 2;
    } else if (kind == "version") {
      std::string version;
      fields >> version;
      if (version != fj_version()) return fail(str_cat("it is for flashjit ", version, ", not ", fj_version()));
      named |= 4;
    } else if (kind == "entry") {
      std::string key, tiles;
      double tflops = 0;
      if (!(fields >> key >> tiles >> tflops)) return fail(str_cat("a malformed line: '", line, "'"));
      try {
        parse_forward_tiles(tiles.c_str());
      } catch (const Error& error) {
        return fail(error.what());
      }
      table.tiles[key] = TunedChoice{tiles, tflops};
    } else if (!kind.empty()) {
      return fail(str_cat("an unknown line: '", line, "'"));
    }
  }
  if (named != 7) return fail("it does not name its device, arch and flashjit version");
  return table;
}

// The table of a device, read once (the caller holds g_mutex).
const TuningTable& table_for(const std::string& device_name, int arch) {
  const std::string path = tuning_path(device_name, arch);
  auto found = g_tables.find(path);
  if (found != g_tables.end()) return found->second;
  TuningTable table = read_table(path, device_name, arch);
  if (!table.problem.empty()) {
    std::fprintf(stderr, "flashjit: warning: ignoring the tuning file %s: %s\n", path.c_str(), table.problem.c_str());
  }
  return g_tables.emplace(path, std::move(table)).first->second;
}

const char* band(int64_t seqlen_k) {
  return seqlen_k <= 2048 ? "keys-2k" : seqlen_k <= 8192 ? "keys-8k" : "keys-more";
}

}  // namespace

std::string tuning_key(const KernelTraits& traits, int64_t seqlen_k) {
  const auto padded = [](int dim) { return (dim + 63) / 64 * 64; };
  std::string mask = "none";
  if (traits.mask == MaskKind::kBool) mask = "bool";
  if (traits.mask == MaskKind::kAdditive) mask = str_cat("add-", dtype_name(traits.mask_dtype));
  return str_cat(dtype_name(traits.dtype), "_qk", padded(traits.head_dim_qk), "_v", padded(traits.head_dim_v),
                 "_mask-", mask, traits.window ? "_window" : "", traits.dropout ? "_dropout" : "",
                 traits.softcap ? "_softcap" : "", "_", band(seqlen_k));
}

ForwardTiles tuned_forward_tiles(const std::string& device_name, int arch, const std::string& key) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const TuningTable& table = table_for(device_name, arch);
  auto found = table.tiles.find(key);
  return found == table.tiles.end() ? ForwardTiles{} : parse_forward_tiles(found->second.tiles.c_str());
}

std::string save_tuning(const std::string& device_name, int arch, const std::string& entries) {
  const std::string path = tuning_path(device_name, arch);
  // The classes measured before and not measured now stay (a valid file's only).
  std::map<std::string, TunedChoice> choices = read_table(path, device_name, arch).tiles;
  std::istringstream lines(entries);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::string key, tiles;
    double tflops = 0;
    if (!(fields >> key)) continue;  // a blank line
    if (!(fields >> tiles >> tflops)) {
      throw_value_error("[tuning] entries: expected lines '<key> <tiles> <TFLOP/s>', got '", line, "'");
    }
    if (tiles == kBuiltIn) {
      choices.erase(key);
      continue;
    }
    parse_forward_tiles(tiles.c_str());  // raises naming a bad configuration
    choices[key] = TunedChoice{tiles, tflops};
  }
  std::string body = str_cat(kHeader, "\ndevice ", device_name, "\narch ", arch, "\nversion ", fj_version(), "\n");
  for (const auto& [key, choice] : choices) body += str_cat("entry ", key, " ", choice.tiles, " ", choice.tflops, "\n");
  make_directories(path.substr(0, path.rfind('/')));
  write_atomically(path, body + "checksum " + checksum_text(body) + "\n");
  clear_tuning();
  return path;
}

std::string describe_tuning(const std::string& device_name, int arch) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const std::string path = tuning_path(device_name, arch);
  const TuningTable& table = table_for(device_name, arch);
  if (!table.present) return str_cat(path, ": none (nothing tuned; built-in choices)");
  if (!table.problem.empty()) return str_cat(path, ": ignored: ", table.problem);
  std::string out = str_cat(path, ": ", table.tiles.size(), " tuned classes");
  for (const auto& [key, choice] : table.tiles) out += str_cat("\n", key, " ", choice.tiles);
  return out;
}

void clear_tuning() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_tables.clear();
}

}  // namespace flashjit::cuda
