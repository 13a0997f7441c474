// No-GPU contract check of the plugin library: loads it with dlopen, as TensorRT's
// IPluginRegistry::loadLibrary does, and checks what TensorRT asks of it before any kernel runs:
// creators and their fields, plugin creation (and refusal of bad fields), output types and
// shapes (through a small IExprBuilder of constants), supported formats, the KV cache alias,
// and serialize -> re-create. Prints one line per check, "ok ..." or "FAIL ...", and exits 1 on
// any failure.  Usage: plugin_harness libedge_sdk_plugins.so
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

int gFailures = 0;

void check(bool ok, std::string const& what) {
    std::printf("%s %s\n", ok ? "ok" : "FAIL", what.c_str());
    if (!ok) ++gFailures;
}

// Constant dimension expressions: enough for shape checks with known input sizes.
class ConstExpr : public apiv::VDimensionExpr {
public:
    explicit ConstExpr(int64_t v) : mValue(v) {}
    bool isConstant() const override { return true; }
    int64_t getConstantValue() const override { return mValue; }
    bool isSizeTensor() const override { return false; }

private:
    int64_t mValue;
};

class Dim : public IDimensionExpr {
public:
    explicit Dim(int64_t v) : mExpr(v) { mImpl = &mExpr; }

private:
    ConstExpr mExpr;
};

class Builder : public apiv::VExprBuilder {
public:
    IDimensionExpr const* constant(int64_t v) override { return &mDims.emplace_back(v); }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override {
        int64_t const x = a.getConstantValue(), y = b.getConstantValue();
        switch (op) {
        case DimensionOperation::kSUM: return constant(x + y);
        case DimensionOperation::kPROD: return constant(x * y);
        case DimensionOperation::kMAX: return constant(x > y ? x : y);
        case DimensionOperation::kMIN: return constant(x < y ? x : y);
        case DimensionOperation::kSUB: return constant(x - y);
        case DimensionOperation::kFLOOR_DIV: return constant(x / y);
        case DimensionOperation::kCEIL_DIV: return constant((x + y - 1) / y);
        default: return constant(-1);
        }
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override { return nullptr; }

private:
    std::deque<Dim> mDims;  // stable addresses
};

class ExprBuilder : public IExprBuilder {
public:
    ExprBuilder() { mImpl = &mBuilder; }
    DimsExprs dims(std::vector<int64_t> const& values) {
        DimsExprs d{};
        d.nbDims = static_cast<int32_t>(values.size());
        for (size_t i = 0; i < values.size(); ++i) d.d[i] = constant(values[i]);
        return d;
    }

private:
    Builder mBuilder;
};

std::string shapeOf(DimsExprs const& d) {
    std::string s = "[";
    for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? "," : "") + std::to_string(d.d[i]->getConstantValue());
    return s + "]";
}

struct Case {
    char const* name;
    std::vector<std::pair<char const*, int32_t>> fields;
    std::vector<std::pair<char const*, int32_t>> badFields;
    std::vector<std::vector<int64_t>> inputShapes;
    std::vector<DataType> inputTypes;
    std::vector<std::string> wantShapes;
    int32_t aliasedOutput;  // -1: none
};

PluginFieldCollection collection(std::vector<std::pair<char const*, int32_t>> const& values, std::vector<PluginField>& store) {
    store.clear();
    for (auto const& v : values) store.emplace_back(v.first, &v.second, PluginFieldType::kINT32, 1);
    PluginFieldCollection fc{};
    fc.nbFields = static_cast<int32_t>(store.size());
    fc.fields = store.data();
    return fc;
}

std::vector<int32_t> fieldValues(PluginFieldCollection const* fc) {
    std::vector<int32_t> v;
    for (int32_t i = 0; i < fc->nbFields; ++i) v.push_back(*static_cast<int32_t const*>(fc->fields[i].data));
    return v;
}

void runCase(IPluginCreatorV3One* creator, Case const& c) {
    std::string const tag = std::string(c.name) + ": ";
    std::vector<PluginField> store;
    PluginFieldCollection fc = collection(c.fields, store);
    IPluginV3* plugin = creator->createPlugin(c.name, &fc, TensorRTPhase::kBUILD);
    check(plugin != nullptr, tag + "created from its fields");
    if (plugin == nullptr) return;
    PluginFieldCollection bad = collection(c.badFields, store);
    IPluginV3* refused = creator->createPlugin(c.name, &bad, TensorRTPhase::kBUILD);
    check(refused == nullptr, tag + "refuses invalid fields");
    delete refused;

    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuildV2*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core && build && runtime, tag + "core, build and runtime capabilities");
    check(std::strcmp(core->getPluginName(), c.name) == 0 && std::strcmp(core->getPluginVersion(), "1") == 0,
          tag + "name and version");
    check(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0 && build->getInterfaceInfo().major == 2,
          tag + "build interface is V2 (aliased I/O)");
    int32_t const nbIn = static_cast<int32_t>(c.inputShapes.size());
    int32_t const nbOut = build->getNbOutputs();
    check(nbOut == static_cast<int32_t>(c.wantShapes.size()), tag + "outputs: " + std::to_string(nbOut));

    for (DataType floatType : {DataType::kHALF, DataType::kFLOAT}) {
        std::vector<DataType> inTypes = c.inputTypes;
        for (auto& t : inTypes) if (t == DataType::kFLOAT) t = floatType;
        std::vector<DataType> outTypes(nbOut);
        check(build->getOutputDataTypes(outTypes.data(), nbOut, inTypes.data(), nbIn) == 0 && outTypes[0] == floatType,
              tag + "output type follows the activations (" + (floatType == DataType::kHALF ? "half" : "float") + ")");
        std::vector<DynamicPluginTensorDesc> io(nbIn + nbOut);
        for (int32_t i = 0; i < nbIn + nbOut; ++i) {
            io[i].desc.type = i < nbIn ? inTypes[i] : outTypes[i - nbIn];
            io[i].desc.format = TensorFormat::kLINEAR;
        }
        bool all = true;
        for (int32_t pos = 0; pos < nbIn + nbOut; ++pos) all = all && build->supportsFormatCombination(pos, io.data(), nbIn, nbOut);
        check(all, tag + "accepts linear " + (floatType == DataType::kHALF ? "half" : "float") + " I/O");
        io[0].desc.format = TensorFormat::kCHW32;
        check(!build->supportsFormatCombination(0, io.data(), nbIn, nbOut), tag + "refuses a non-linear format");
        io[0].desc.format = TensorFormat::kLINEAR;
        io[0].desc.type = DataType::kINT32;
        check(!build->supportsFormatCombination(0, io.data(), nbIn, nbOut), tag + "refuses int32 activations");
    }

    ExprBuilder expr;
    std::vector<DimsExprs> in;
    for (auto const& s : c.inputShapes) in.push_back(expr.dims(s));
    std::vector<DimsExprs> out(nbOut);
    int32_t const rc = build->getOutputShapes(in.data(), nbIn, nullptr, 0, out.data(), nbOut, expr);
    for (int32_t i = 0; rc == 0 && i < nbOut; ++i)
        check(shapeOf(out[i]) == c.wantShapes[i], tag + "output " + std::to_string(i) + " shape " + shapeOf(out[i]));
    check(rc == 0, tag + "getOutputShapes succeeds");
    for (int32_t i = 0; i < nbOut; ++i)
        check(build->getAliasedInput(i) == (i == c.aliasedOutput ? i : -1),
              tag + "output " + std::to_string(i) + (i == c.aliasedOutput ? " aliases its input (in place)" : " is not aliased"));

    PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
    IPluginV3* again = creator->createPlugin(c.name, saved, TensorRTPhase::kRUNTIME);
    check(again != nullptr, tag + "re-created from its serialized fields");
    if (again) {
        auto* againRuntime = static_cast<IPluginV3OneRuntime*>(again->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        check(fieldValues(againRuntime->getFieldsToSerialize()) == fieldValues(saved), tag + "fields survive serialization");
        IPluginV3* copy = again->clone();
        check(copy != nullptr, tag + "clone");
        delete copy;
        delete again;
    }
    delete plugin;
}

} // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s LIBRARY.so\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
        std::fprintf(stderr, "%s: cannot load: %s\n", argv[1], dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    check(getCreators != nullptr, "library exports getCreators");
    if (getCreators == nullptr) return 1;
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    check(n == 2, "two creators");

    // Ministral-3-3B shapes: hidden 3072, q/k/v fused 4096 + 2 x 1024, 32/8 heads of 128.
    std::vector<Case> const cases = {
        {"Int4GroupwiseGemm", {{"gemm_n", 6144}, {"gemm_k", 3072}, {"group_size", 128}},
         {{"gemm_n", 6144}, {"gemm_k", 3072}, {"group_size", 96}},
         {{1, 7, 3072}, {3072, 3072}, {24, 6144}}, {DataType::kFLOAT, DataType::kINT8, DataType::kFLOAT},
         {"[1,7,6144]"}, -1},
        {"EdgeAttention", {{"num_q_heads", 32}, {"num_kv_heads", 8}, {"head_size", 128}},
         {{"num_q_heads", 32}, {"num_kv_heads", 6}, {"head_size", 128}},
         {{1, 7, 6144}, {1, 2, 8, 4096, 128}, {1}, {1, 7, 128}, {1, 7, 128}, {1, 7}},
         {DataType::kFLOAT, DataType::kFLOAT, DataType::kINT32, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT},
         {"[1,7,4096]", "[1,2,8,4096,128]"}, 1},
    };
    for (Case const& c : cases) {
        IPluginCreatorV3One* creator = nullptr;
        for (int32_t i = 0; i < n; ++i) {
            auto* candidate = static_cast<IPluginCreatorV3One*>(creators[i]);
            if (std::strcmp(candidate->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0 &&
                std::strcmp(candidate->getPluginName(), c.name) == 0)
                creator = candidate;
        }
        check(creator != nullptr, std::string("creator ") + c.name);
        if (creator == nullptr) continue;
        PluginFieldCollection const* names = creator->getFieldNames();
        std::string list;
        for (int32_t i = 0; i < names->nbFields; ++i) list += std::string(i ? "," : "") + names->fields[i].name;
        std::string want;
        for (size_t i = 0; i < c.fields.size(); ++i) want += std::string(i ? "," : "") + c.fields[i].first;
        check(list == want, std::string(c.name) + ": fields " + list);
        runCase(creator, c);
    }
    return gFailures == 0 ? 0 : 1;
}
